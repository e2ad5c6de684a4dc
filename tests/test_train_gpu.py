"""Training on a GPU (skipped without one): fp16 ResNet-50 through DeepSpeed on DALI GPU batches."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline import engine
from tests.shardsets import labelled_set
from tests.test_train import ROOT, metrics, ok, train_cli

pytestmark = pytest.mark.gpu


def test_fp16_resnet50_trains_with_dynamic_loss_scaling(tmp_path):
    data = labelled_set(tmp_path / "data", train=160, val=21)
    ds = json.loads((ROOT / "ds_configs" / "bs256.json").read_text())
    ds.update(train_batch_size=64, train_micro_batch_size_per_gpu=32)
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    out = tmp_path / "run"
    stdout = ok(
        train_cli(
            "--deepspeed_config",
            str(tmp_path / "ds.json"),
            "--data-dir",
            str(data),
            "--epochs",
            "2",
            "--warmup-epochs",
            "1",
            "--out-dir",
            str(out),
            "--wandb-mode",
            "disabled",
            "--log-every",
            "1",
        )  # fmt: skip
    )
    assert "fp16" in stdout and "note:" not in stdout  # no bf16 fallback on a GPU
    epochs, summary = metrics(out)
    assert summary["steps"] == 2 * 3 and all(e["images_per_sec"] > 0 for e in epochs)
    # Dynamic loss scaling starts at 2^16; early overflows are skipped steps, counted, never silent.
    assert summary["skipped_steps"] == epochs[-1]["skipped_steps"] >= 0


def test_engine_keeps_fp32_master_weights_and_channels_last(tmp_path):
    from pipeline import distributed
    from pipeline.model import build_model
    from pipeline.scaling import Recipe
    from pipeline.schedule import derive

    distributed.init()  # a one-process NCCL group (sets the rendezvous variables when no launcher did)

    ds = json.loads((ROOT / "ds_configs" / "bs256.json").read_text())
    ds, notes = engine.fit({**ds, "train_batch_size": 32}, "bs256.json", 1, cuda=True)
    s = derive("warmup_decay", Recipe(32, train_images=1000, epochs=2, warmup_epochs=1))
    model, _ = build_model("resnet50", 10)
    eng = engine.build(model, engine.with_schedule(ds, s), s, channels_last=True)
    assert next(eng.module.parameters()).dtype == torch.float16 and engine.loss_scale(eng) == 2.0**16
    assert eng.module.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    # DeepSpeed's fused fp16 optimizer keeps flat fp32 copies, the unfused one per-parameter copies.
    masters = getattr(eng.optimizer, "fp32_groups_flat", None) or [p for g in eng.optimizer.fp32_groups for p in g]
    assert masters and all(p.dtype == torch.float32 for p in masters)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in masters if p.dim() == 4)
