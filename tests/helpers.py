"""What several test files share: paths, small-run flags, the train.py command line, run outputs, small models
and reference images. Test files import from here, never from each other."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import checkpoint, scaling
from pipeline.distributed import without_launcher

ROOT = Path(__file__).parent.parent
TRAIN = str(ROOT / "pipeline" / "train.py")
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="shows what a host without usable CUDA does")
SMALL = ["--arch", "resnet18", "--crop-size", "32", "--val-resize", "36", "--data-threads", "1"]


def train_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python pipeline/train.py args` as a user would (one process, no launcher variables)."""
    clean = without_launcher(os.environ)
    proc = subprocess.run(
        [sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=600, env={**clean, **(env or {})}
    )
    return proc


def ok(proc: subprocess.CompletedProcess) -> str:
    """stdout of a run that must have succeeded."""
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def metrics(out: Path) -> tuple[list[dict], dict]:
    """The epoch lines and the summary line of metrics.jsonl."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "summary" not in x], lines[-1]


def ds_file(folder: Path, batch: int, micro: int, precision: str) -> str:
    """A DeepSpeed configuration from the linear scaling rule, for small test batches."""
    path = folder / f"b{batch}-{micro}-{precision}.json"
    path.write_text(scaling.render(scaling.ds_config(scaling.Recipe(batch, micro, precision, fused=False))))
    return str(path)


def weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    """The model state DeepSpeed saved at `step`."""
    states = torch.load(out / "checkpoints" / checkpoint.tag(step) / "mp_rank_00_model_states.pt", weights_only=False)
    return states["module"]


def small_convnet() -> torch.nn.Module:
    """Conv, BN, ReLU, pooling and a linear layer: every parameter kind a ResNet has."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3),
    )  # fmt: skip


def reference_val(data: bytes, resize: int, crop: int) -> np.ndarray:
    """Resize the shorter side (bilinear, antialiased, size rounded) and take the center crop, with Pillow."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    scale = resize / min(w, h)
    size = (resize, int(h * scale + 0.5)) if w <= h else (int(w * scale + 0.5), resize)
    image = image.resize(size, Image.BILINEAR)
    left, top = int((size[0] - crop) / 2 + 0.5), int((size[1] - crop) / 2 + 0.5)
    return np.asarray(image.crop((left, top, left + crop, top + crop)))
