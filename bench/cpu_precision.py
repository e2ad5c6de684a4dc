"""How fast this CPU runs each precision: ResNet-18's forward and backward pass on 32 images, per mode and crop.

    python bench/cpu_precision.py [--crops 32,64] [--repeats 2] [--results DIR]

Modes: fp32; bf16 and fp16 weights and inputs (DeepSpeed's wrappers compute so); autocast-bf16 and
autocast-fp16 (torch.autocast over fp32 weights). The best of --repeats timed passes after one warm-up pass
is reported, with the slowdown against fp32. On a CPU without native 16-bit instructions (pipeline/cpu.py)
oneDNN emulates the 16-bit kernels; this says by how much, and is what ds_configs/cpu.json's
"bf16": {"enabled": "auto"} rests on. Writes bench/results/<date>-<device>-precision.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench.common import BENCH, machine  # noqa: E402
from bench.report import device_name, device_slug  # noqa: E402
from pipeline import cpu  # noqa: E402
from pipeline.model import build_model  # noqa: E402

MODES = ("fp32", "bf16", "fp16", "autocast-bf16", "autocast-fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def seconds_per_pass(mode: str, crop: int, repeats: int) -> float:
    """The best wall time of one forward and backward pass of 32 images in `mode`."""
    torch.manual_seed(0)
    model, _ = build_model("resnet18", 10)
    images, labels = torch.randn(32, 3, crop, crop), torch.randint(0, 10, (32,))
    low = DTYPES.get(mode.removeprefix("autocast-"))
    if low is not None and not mode.startswith("autocast-"):
        model, images = model.to(low), images.to(low)

    def one() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=low, enabled=mode.startswith("autocast-")):
            logits = model(images)
        F.cross_entropy(logits.float(), labels).backward()
        return time.perf_counter() - start

    one()
    return min(one() for _ in range(repeats))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--crops", default="32,64", help="image sides, comma-separated")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per measurement (the best is kept)")
    p.add_argument("--results", default=str(BENCH / "results"))
    args = p.parse_args(argv)
    info, date = machine(), datetime.date.today().isoformat()
    rows = []
    for crop in (int(c) for c in args.crops.split(",")):
        fp32 = None
        for mode in MODES:
            s = seconds_per_pass(mode, crop, args.repeats)
            fp32 = fp32 or s
            rows.append({"crop": crop, "mode": mode, "seconds": round(s, 3), "vs_fp32": round(s / fp32, 1)})
            print(f"{crop} px {mode}: {s:.2f} s per pass ({s / fp32:.1f}x fp32)", flush=True)
    command = "python bench/cpu_precision.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {
        "device": device_name(info),
        "date": date,
        "command": command.strip(),
        "capability": cpu.described(),
        "default_precision": cpu.default_precision(),
        "machine": info,
        "rows": rows,
    }
    stem = Path(args.results) / f"{date}-{device_slug(info)}-precision"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# ResNet-18 forward and backward, 32 images, by precision: {result['device']}",
        "",
        f"{date}, `{result['command']}`, torch {torch.__version__}, capability {result['capability']} (cpu.json "
        f"trains in {result['default_precision']} here).",
        "",
        "| crop | mode | seconds per pass | vs fp32 |",
        "|---|---|---|---|",
        *(f"| {r['crop']} | {r['mode']} | {r['seconds']:.2f} | {r['vs_fp32']:.1f}x |" for r in rows),
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"written to {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
