"""What the benchmarks share: the generated ImageNet-like photos and a description of the machine."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import time
from pathlib import Path

import PIL
from PIL import features

from data_prep.synthetic import generate

BENCH = Path(__file__).resolve().parent
# ImageNet-like photos: 500x375 landscape at quality 95 with enough detail for ~110 KB files.
TREE = dict(min_side=375, max_side=375, noise=32.0, aspects=(4 / 3,), quality=(95, 95))


# Distinct photos generated at most (about 30 s on one core); larger trees repeat them under new names.
UNIQUE_PHOTOS = 2100


def bench_tree(images: int) -> Path:
    """A generated ImageNet-layout tree of about `images` photos in 20 classes, cached under bench/work/.
    Beyond UNIQUE_PHOTOS the training photos are hard links to the generated ones (decoding costs the same)."""
    classes, val_per_class = 20, 5
    train_per_class = max(1, images // classes - val_per_class)
    root = BENCH / "work" / f"tree-{images}"
    if not (root / ".complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        if images <= UNIQUE_PHOTOS:
            generate(str(root), classes=classes, train_per_class=train_per_class, val_per_class=val_per_class, **TREE)
        else:
            _repeat(bench_tree(UNIQUE_PHOTOS), root, train_per_class)
        (root / ".complete").touch()
    return root


def _repeat(base: Path, root: Path, train_per_class: int) -> None:
    """A copy of `base` (hard links) with `train_per_class` training photos per class, cycling through its own."""
    shutil.copytree(base / "val", root / "val", copy_function=os.link)
    for folder in sorted((base / "train").iterdir()):
        photos = sorted(folder.glob("*.JPEG"))
        (root / "train" / folder.name).mkdir(parents=True)
        for i in range(train_per_class):
            os.link(photos[i % len(photos)], root / "train" / folder.name / f"{folder.name}_{i}.JPEG")


def timed(fn) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def machine() -> dict:
    """What ran the benchmark: host, CPU, cores this process may use, GPU, library versions."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    info = {
        "host": socket.gethostname(),
        "cpu": cpu or platform.processor(),
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "libjpeg_turbo": features.version("libjpeg_turbo"),
    }
    try:
        import torch

        from pipeline import cpu as host_cpu

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        # What the processor computes natively: 16-bit CPU runs are about 30x slower without it (pipeline/cpu.py).
        info["cpu_capability"] = host_cpu.described()
    except ImportError:
        pass
    return info


def write_results(kind: str, result: dict, text: str) -> None:
    """Save a benchmark's results as bench/results/<date>-<kind>-<host>.json and .md, and print the table."""
    stem = BENCH / "results" / f"{result['date']}-{kind}-{result['machine']['host']}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    Path(f"{stem}.md").write_text(text)
    print(text)
    print(f"written: {stem}.json, {stem}.md")
