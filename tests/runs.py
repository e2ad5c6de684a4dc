"""Running what users run, from the tests: pipeline/train.py, `python -m` commands and the GPU session script, with
their flags for small runs, and reading what a run leaves behind (metrics, weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint, scaling
from pipeline.launch import without_launcher
from tests import procs

ROOT = Path(__file__).parent.parent

TRAIN = str(ROOT / "pipeline" / "train.py")

# Small pictures keep the suite fast; the code paths are the same as for full-size photos.
TREE = dict(classes=6, train_per_class=30, val_per_class=7, min_side=32, max_side=72, quirks=True)

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="shows what a host without usable CUDA does")

SMALL = ["--arch", "resnet18", "--crop-size", "32", "--val-resize", "36", "--data-threads", "1"]

# Runs in 16 bits: on a CPU without native bf16 or fp16 (AVX2) 16-bit kernels are emulated, and ResNet-18 takes 3 s
# per 16 images even at 32 px; ShuffleNet V2 x0.5 takes 0.2 s.
SMALL_16BIT = ["--arch", "shufflenet_v2_x0_5", "--crop-size", "32", "--val-resize", "36", "--data-threads", "1"]


def train_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python pipeline/train.py args` as a user would (one process, no launcher variables)."""
    clean = without_launcher(os.environ)
    proc = procs.run(
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


def run_module(module: str, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m module args...` as a user would, capturing its output (without this process's rendezvous
    variables: a test's own process group is not the command's)."""
    proc = procs.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=600,
                          env=without_launcher(os.environ))  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


SESSION = ROOT / "bench" / "gpu" / "session.sh"


def run_session(tmp_path, *args: str, script: Path = SESSION, site: Path | None = None, demo: Path | None = None,
                python: Path | None = None, timeout: float = procs.TIMEOUT) -> subprocess.CompletedProcess:  # fmt: skip
    """bench/gpu/session.sh at a CPU's setting (SMALL=1) with this venv's Python, its libraries counted as
    installed (unless `site` says where to install them), the results under tmp_path, the built-in dataset at
    `demo` (a folder holding shards/)."""
    if site is None:
        site = tmp_path / "site"
        site.mkdir(exist_ok=True)
        (site / ".installed").touch()
    env = {**os.environ, "PYTHON": str(python or sys.executable), "SITE": str(site), "OUT": str(tmp_path / "out"),
           "RESULTS": str(tmp_path / "results"), "SMALL": "1", "DEMO": str(demo or tmp_path / "demo")}  # fmt: skip
    return procs.run(["bash", str(script), *args], capture_output=True, text=True, env=env, timeout=timeout)
