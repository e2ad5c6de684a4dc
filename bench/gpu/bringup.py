"""The GPU session's first check: versions, the GPU, and every module of the project imported together with torch,
DeepSpeed and DALI (a module that fails to import ends the session here, not minutes later).

    python bench/gpu/bringup.py --out RESULTS/<date>-<device>-bringup.txt
"""

import argparse
import importlib
import pkgutil
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "data_prep", "bench")


def modules() -> list[str]:
    """Every module of the project's packages (bench/gpu's scripts and bench/fp16_cpu_train.py aside)."""
    names = []
    for package in PACKAGES:
        names.append(package)
        path = [str(ROOT / package)]
        names += [m.name for m in pkgutil.walk_packages(path, prefix=f"{package}.") if m.name != "bench.fp16_cpu_train"]
    return names


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    lines, failed = [], []
    import deepspeed
    import nvidia.dali
    import torch
    import torchvision

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    versions = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "torchvision": torchvision.__version__,
        "deepspeed": deepspeed.__version__,
        "dali": nvidia.dali.__version__,
        "gpu": gpu,
    }
    lines.append(" ".join(f"{k} {v}" for k, v in versions.items()))
    if gpu:
        x = torch.randn(1024, 1024, device="cuda", dtype=torch.float16)
        lines.append(
            f"cuda matmul ok: {float((x @ x).float().abs().mean()):.3f}; bf16 {torch.cuda.is_bf16_supported()}"
        )
    for name in modules():
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 (every failure is reported, then the session ends)
            failed.append(name)
            lines.append(f"import {name} FAILED:\n{traceback.format_exc()}")
    count = len(modules())
    lines.append(
        f"imported {count - len(failed)} of {count} modules" + (f"; failed: {', '.join(failed)}" * bool(failed))
    )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
