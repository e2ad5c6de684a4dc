"""Shared fixtures: small generated ImageNet trees (with every quirk) and their prepared shards."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_prep.imagenet import prepare
from data_prep.synthetic import generate
from tests import procs
from tests.runs import TREE


@pytest.fixture(autouse=True)
def no_process_outlives_its_test():
    """Whatever a test started (launchers, ranks, training runs) ends with it, passed, failed or timed out."""
    yield
    procs.end_all()


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

    from pipeline.launch import free_port

    with pytest.MonkeyPatch.context() as env:
        for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
            env.setenv(name, value)
        env.setenv("MASTER_PORT", str(free_port()))
        deepspeed.init_distributed(dist_backend="gloo")
        yield


@pytest.fixture
def fp16_cpu(monkeypatch):
    """DeepSpeed's fp16 wrapper on its CPU accelerator, for this test (as bench/fp16_cpu_train.py allows it)."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
