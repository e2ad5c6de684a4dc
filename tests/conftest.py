"""Shared fixtures: small generated ImageNet trees (with every quirk) and their prepared shards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.imagenet import prepare
from data_prep.synthetic import generate
from pipeline.format import example, tfrecord

# Small pictures keep the suite fast; the code paths are the same as for full-size photos.
TREE = dict(classes=6, train_per_class=30, val_per_class=7, min_side=32, max_side=72, quirks=True)


def run_module(module: str, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m module args...` as a user would, capturing its output (without this process's rendezvous
    variables: a test's own process group is not the command's)."""
    from pipeline.distributed import without_launcher

    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=600,
                          env=without_launcher(os.environ))  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_shard(path: Path) -> list[dict]:
    """Every record of a shard, decoded into {feature: first value}."""
    with open(path, "rb") as f:
        return [{k: v[0] for k, v in example.decode(r.data).items()} for r in tfrecord.read_records(f, str(path))]


def shards_of(folder: Path, split: str) -> list[Path]:
    """The shard files of one split, in order."""
    return sorted(p for p in folder.glob(f"{split}-*") if not p.name.endswith(".idx"))


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """{relative path: content} of every file under a folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def quirky_tree(tmp_path_factory) -> Path:
    """An ImageNet-layout tree with class-folder validation and every quirk data prep must handle."""
    return generate(str(tmp_path_factory.mktemp("raw") / "imagenet"), **TREE)


@pytest.fixture(scope="session")
def prepared(quirky_tree, tmp_path_factory) -> Path:
    """The quirky tree prepared into 4 train and 3 validation shards by 2 worker processes."""
    out = tmp_path_factory.mktemp("shards") / "out"
    prepare(str(quirky_tree), str(out), train_shards=4, val_shards=3, workers=2, seed=7)
    return out


@pytest.fixture(scope="session")
def process_group():
    """A one-process gloo group for real DeepSpeed engines inside the test process; its variables are undone after."""
    import deepspeed

    from pipeline.distributed import free_port

    with pytest.MonkeyPatch.context() as env:
        for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
            env.setenv(name, value)
        env.setenv("MASTER_PORT", str(free_port()))
        deepspeed.init_distributed(dist_backend="gloo")
        yield


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
