"""Training on a GPU (skipped without one): ResNet-50 through DeepSpeed on DALI GPU batches in both fp16 modes,
the fused-SGD step on channels-last weights, fp32 batch norm, the loss scale moving, and a step without syncs."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from pipeline import deepspeed_json, engine, loss_scale, train
from pipeline.launch import without_launcher
from pipeline.meters import StepMeter
from tests import procs
from tests.runs import ROOT, metrics, ok, weights
from tests.shardsets import labelled_set

pytestmark = pytest.mark.gpu


def small_config(tmp_path, name: str, batch: int = 64) -> str:
    """A committed configuration at a test-sized batch (micro-batch 32: 2 micro-steps per optimizer step)."""
    ds = json.loads((ROOT / "ds_configs" / name).read_text())
    ds.update(train_batch_size=batch, train_micro_batch_size_per_gpu=32)
    (tmp_path / name).write_text(json.dumps(ds))
    return str(tmp_path / name)


@pytest.mark.parametrize("name, conv_dtype", [("bs256.json", torch.float16), ("bs256-autocast.json", torch.float32)])
def test_fp16_resnet50_trains_and_its_loss_scale_moves(tmp_path, name, conv_dtype):
    data, out = labelled_set(tmp_path / "data", train=160, val=21), tmp_path / "run"
    args = ["--deepspeed_config", small_config(tmp_path, name), "--data-dir", str(data), "--epochs", "2",
            "--warmup-epochs", "1", "--out-dir", str(out), "--wandb-mode", "disabled", "--log-every", "1",
            "--loss-scale-window", "2"]  # fmt: skip
    # Infinite pixels in step 2's images: its gradients overflow, the step is skipped and the scale halves.
    # --loss-scale-window 2: after 2 clean steps it doubles again (3 for DeepSpeed's wrapper, which counts from
    # the step after the overflow).
    proc = procs.run([sys.executable, str(ROOT / "tests" / "train_faulty.py"), *args], capture_output=True,
                          text=True, timeout=600, env={**without_launcher(os.environ), "FAULT": "inf@2"})  # fmt: skip
    stdout = ok(proc)
    assert "note:" not in stdout  # no fallback on a GPU
    rows = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    # (A fresh network can overflow at 2^16 by itself too: every skip halves the scale, and step 2 is one.)
    assert rows[0]["loss_scale"] <= 2.0**16
    assert rows[1]["skipped_steps"] == rows[0]["skipped_steps"] + 1
    assert rows[1]["loss_scale"] == rows[0]["loss_scale"] / 2
    for before, after in zip(rows, rows[1:], strict=False):
        assert (after["skipped_steps"] > before["skipped_steps"]) == (after["loss_scale"] < before["loss_scale"])
    assert any(after["loss_scale"] > before["loss_scale"] for before, after in zip(rows[1:], rows[2:], strict=False))
    epochs, summary = metrics(out)
    assert summary["steps"] == 2 * 3
    assert summary["skipped_steps"] >= 1
    assert all(e["images_per_sec"] > 0 for e in epochs)
    saved = weights(out, summary["steps"])
    # Batch norm in fp32 (weights and running statistics), the convolutions channels-last.
    assert saved["bn1.weight"].dtype == saved["bn1.running_mean"].dtype == torch.float32
    assert torch.isfinite(saved["bn1.running_var"]).all()
    conv = saved["conv1.weight"]
    assert conv.dtype == conv_dtype
    assert conv.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", ["bs256.json", "bs256-autocast.json"])
def test_fused_sgd_steps_channels_last_weights(name):
    """The first fused-SGD step on NHWC weights: every tensor it walks (weight or master, gradient, momentum) in
    one layout, and the weights as initialised until then."""
    from pipeline import distributed, schedule
    from pipeline.model import build_model

    distributed.init()  # a one-process NCCL group (sets the rendezvous variables when no launcher did)
    ds = json.loads((ROOT / "ds_configs" / name).read_text())
    ds, _ = deepspeed_json.configure({**ds, "train_batch_size": 32}, name, 1, cuda=True)
    s, ds, _ = schedule.fit("deepspeed", ds, name, schedule.RunSteps(32, 1000, 2, 1, 256, 0.1))
    model, _ = build_model("resnet50", 10)
    initial = model.conv1.weight.detach().clone()
    eng = engine.build(model, ds, s, channels_last=True)
    assert type(eng.lr_scheduler).__name__ == "WarmupDecayLR"
    assert ds["optimizer"]["params"]["fused"]
    assert loss_scale.LossScale(eng).now()[0] == 2.0**16
    assert torch.equal(eng.module.conv1.weight.float().cpu(), initial.to(eng.module.conv1.weight.dtype).float())
    assert eng.module.bn1.weight.dtype == eng.module.bn1.running_mean.dtype == torch.float32
    dtype = getattr(torch, deepspeed_json.DATA_DTYPES[deepspeed_json.precision(ds)])
    x = torch.randn(32, 3, 64, 64, device=eng.device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (32,), device=eng.device)
    for _ in range(3):
        eng.backward(torch.nn.functional.cross_entropy(eng(x).float(), labels))
        eng.step()
    assert eng.global_steps == 3
    for p, state in engine._optimizer_state(eng.optimizer):
        assert p.dtype == torch.float32
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=torch.channels_last)
            assert state["momentum_buffer"].stride() == p.stride()


def test_training_steps_between_flushes_do_not_sync(tmp_path):
    """The autocast mode with fused SGD: forward, backward, the scaled optimizer step, the schedule and the meters
    run under torch.cuda.set_sync_debug_mode("error"), which raises on any host-device sync."""
    data = labelled_set(tmp_path / "data", train=128, val=21)
    argv = ["--deepspeed_config", small_config(tmp_path, "bs256-autocast.json"), "--data-dir", str(data),
            "--epochs", "2", "--warmup-epochs", "1", "--out-dir", str(tmp_path / "run"),
            "--wandb-mode", "disabled"]  # fmt: skip
    run = train.assemble(*train.parse(argv))
    assert run.precision == "autocast-fp16"
    assert run.accum == 2
    eng = run.engine
    images = torch.randn(32, 3, 224, 224, device=eng.device, dtype=torch.float16)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, run.data.num_classes, (32,), device=eng.device)
    meter = StepMeter(run.micro, run.schedule.steps_per_epoch, eng.device)
    for _ in range(4):  # warm-up: cuDNN's autotuning and the scaler's first scale may synchronise
        run.stepper.step(images, labels, meter)
    meter.flush()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        closed = [run.stepper.step(images, labels, meter) for _ in range(6)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert closed == [False, True] * 3
    assert eng.global_steps == 5
    rows = meter.flush()  # the sync point
    run.stepper.scale.resolve(rows)
    assert [r["step"] for r in rows] == [3, 4, 5]
    assert all(r["skipped_steps"] == 0 for r in rows)
    train.distributed.close()
