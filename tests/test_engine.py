"""The engine as built, before and after its first steps: DeepSpeed's start-up step undone, optimizer state laid
out like its weights, batch norm in fp32, the one-read overflow check, and the autocast mode's loss scaling."""

import pytest
import torch

from pipeline import deepspeed_json, engine, loss_scale
from pipeline.meters import StepMeter
from tests.models import constant_schedule, small_convnet

SCHEDULE = constant_schedule(0.5, total_steps=20, steps_per_epoch=5)
MODES = {
    "bf16": {"bf16": {"enabled": True}},
    "fp32": {},
    "autocast-bf16": {"torch_autocast": {"enabled": True, "dtype": "bf16"}},
    "autocast-fp16": {"torch_autocast": {"enabled": True, "dtype": "fp16"}},
}


def ds_of(mode: str, batch: int = 4) -> dict:
    """A DeepSpeed configuration in `mode` with large lr and weight decay, so one stray step shows."""
    sgd = {"lr": 0.5, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}
    ds = {"train_batch_size": batch, "train_micro_batch_size_per_gpu": batch, "gradient_clipping": 0.0,
          "optimizer": {"type": "SGD", "params": sgd}, **MODES[mode]}  # fmt: skip
    return deepspeed_json.with_schedule(ds, SCHEDULE)


def images(dtype=torch.float32, channels_last=False) -> torch.Tensor:
    """A fixed batch of 4 small images."""
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_built_engine_has_its_initial_weights_and_state_laid_out_like_them(process_group, optimizer, channels_last):
    """DeepSpeed's unfused wrapper steps the optimizer once on zero gradients when it is built: one weight-decay
    step at the peak lr, and momentum buffers made contiguous, which CUDA's fused SGD refuses for NHWC weights."""
    model = small_convnet()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    eng = engine.build(model, ds_of("bf16"), SCHEDULE, optimizer=optimizer, channels_last=channels_last)
    states = list(engine._optimizer_state(eng.optimizer))
    tensors = [(p, v) for p, state in states for v in state.values() if torch.is_tensor(v) and v.dim()]
    assert len(tensors) == len(initial)  # a momentum buffer per parameter (the start-up step made them)
    for p, value in tensors:
        assert value.shape == p.shape
        assert value.stride() == p.stride()
        assert not value.any()
    masters = {p: m for p, m in engine._masters(eng.optimizer)}
    assert len(masters) == len(initial)
    for name, p in eng.module.named_parameters():
        assert torch.equal(masters[p], initial[name]), name
        assert torch.equal(p.float(), initial[name].to(p.dtype).float()), name
        if channels_last and p.dim() == 4:
            assert p.is_contiguous(memory_format=torch.channels_last)
            assert masters[p].stride() == p.stride()


def test_a_resumed_momentum_buffer_takes_its_weights_layout(process_group):
    eng = engine.build(small_convnet(), ds_of("bf16"), SCHEDULE, channels_last=True)
    (p, state), *_ = [(p, s) for p, s in engine._optimizer_state(eng.optimizer) if p.dim() == 4]
    state["momentum_buffer"] = torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape)  # as loaded: NCHW
    engine.match_state_layout(eng.optimizer)
    assert state["momentum_buffer"].stride() == p.stride() != p.contiguous().stride()
    assert torch.equal(state["momentum_buffer"], torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape))


@pytest.mark.parametrize("mode", list(MODES))
def test_batch_norm_stays_fp32_and_its_statistics_move(process_group, mode):
    eng = engine.build(small_convnet(), ds_of(mode), SCHEDULE)
    bn, conv = eng.module[1], eng.module[0]
    assert all(t.dtype == torch.float32 for t in [*bn.parameters(), bn.running_mean, bn.running_var])
    assert conv.weight.dtype == (torch.bfloat16 if mode == "bf16" else torch.float32)
    x = images(torch.bfloat16 if mode in ("bf16", "autocast-bf16") else torch.float32)
    for _ in range(2):
        eng.backward(eng(x).float().square().mean())
        eng.step()
    assert bn.running_mean.dtype == torch.float32
    assert bn.running_mean.abs().sum() > 0
    assert torch.isfinite(bn.running_var).all()
    assert eng.global_steps == 2
    # A small move of a running mean near 1: 1.0 -> 1.0 + 0.1 x (1.0625 - 1.0) = 1.00625, which the engine's batch
    # norm keeps; a bf16 statistic (8 bits of mantissa: steps of 2^-7 at 1) would hold 1.0078125 instead.
    bn.running_mean.fill_(1.0)
    bn(torch.full((4, 8, 2, 2), 1.0625, dtype=x.dtype))
    assert torch.allclose(bn.running_mean, torch.full((8,), 1.00625), rtol=0, atol=1e-7)


def test_the_wrapper_reads_one_overflow_flag_per_step(process_group):
    eng = engine.build(small_convnet(), ds_of("bf16"), SCHEDULE)
    checker = eng.optimizer.overflow_checker
    assert type(checker).__name__ == "OneRead"
    eng.backward(eng(images(torch.bfloat16)).float().square().mean())
    params = [p for group in eng.optimizer.fp16_groups for p in group]
    assert not checker.has_overflow_serial(params)
    for bad in (float("inf"), float("nan")):
        params[3].grad[0] = bad  # one element of one fp32 (batch norm) gradient
        assert checker.has_overflow_serial(params)
        assert checker.check()
        params[3].grad.zero_()
    params[0].grad.view(-1)[5] = float("inf")  # a bf16 convolution gradient
    assert checker.check()


def test_autocast_fp16_scales_the_loss_and_counts_skipped_steps(process_group):
    """torch's GradScaler: DeepSpeed does not count its skips; LossScale reads them from the scale at the flush."""
    eng = engine.build(small_convnet(), ds_of("autocast-fp16"), SCHEDULE)
    assert type(eng.optimizer) is torch.optim.SGD
    assert eng.module[0].weight.dtype == torch.float32
    scale, meter = loss_scale.LossScale(eng), StepMeter(4, SCHEDULE.steps_per_epoch, torch.device("cpu"))
    labels = torch.arange(4) % 3
    for step in range(1, 5):
        before = eng.module[0].weight.detach().clone()
        logits = eng(images() * (float("inf") if step == 2 else 1.0))
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        eng.backward(loss)
        eng.step()
        meter.micro_step(loss, logits, labels)
        now, skipped = scale.now()
        # On the device until the flush.
        assert torch.is_tensor(now)
        assert skipped is None
        meter.optimizer_step(eng.global_steps, 0.5, now, skipped)
        assert torch.equal(eng.module[0].weight, before) == (step == 2)  # the overflow step changes nothing
    rows = meter.flush()
    scale.resolve(rows)
    assert [r["loss_scale"] for r in rows] == [65536.0, 32768.0, 32768.0, 32768.0]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]
    assert scale.skipped == 1
    assert eng.skipped_steps == 0
    # Saved with a checkpoint and restored into a new engine: the scale and the count go on from there.
    saved = scale.state_dict()
    again = loss_scale.LossScale(engine.build(small_convnet(), ds_of("autocast-fp16"), SCHEDULE))
    again.load_state_dict(saved)
    assert again.skipped == 1
    assert again.scaler.get_scale() == 32768.0


def test_the_autocast_loss_scale_grows_after_the_window_and_halves_on_an_overflow(process_group):
    """--loss-scale-window 2 (the GradScaler's growth interval; 2000 by default): the scale doubles after every
    2 clean steps, and an overflow halves it and starts the count again. A growth is not a skip."""
    eng = engine.build(small_convnet(), ds_of("autocast-fp16"), SCHEDULE)
    loss_scale.set_growth_interval(eng, 2)
    scale, meter = loss_scale.LossScale(eng), StepMeter(4, SCHEDULE.steps_per_epoch, torch.device("cpu"))
    labels = torch.arange(4) % 3
    for step in range(1, 6):
        logits = eng(images() * (float("inf") if step == 3 else 1.0))
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        eng.backward(loss)
        eng.step()
        meter.micro_step(loss, logits, labels)
        meter.optimizer_step(eng.global_steps, 0.5, *scale.now())
    rows = meter.flush()
    scale.resolve(rows)
    assert [r["loss_scale"] for r in rows] == [65536.0, 131072.0, 65536.0, 65536.0, 131072.0]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1]
    # A resume brings back the checkpoint's window; this session's --loss-scale-window, where given, wins.
    resumed = engine.build(small_convnet(), ds_of("autocast-fp16"), SCHEDULE)
    loss_scale.LossScale(resumed).load_state_dict(scale.state_dict())
    assert resumed.torch_autocast_z0_gradscaler.get_growth_interval() == 2
    flagged = engine.build(small_convnet(), ds_of("autocast-fp16"), SCHEDULE)
    loss_scale.LossScale(flagged, 5).load_state_dict(scale.state_dict())
    assert flagged.torch_autocast_z0_gradscaler.get_growth_interval() == 5
    default = engine.build(small_convnet(), ds_of("autocast-fp16"), SCHEDULE)
    loss_scale.set_growth_interval(default, 0)
    assert default.torch_autocast_z0_gradscaler.get_growth_interval() == 2000


def test_the_loss_scale_window_reaches_deepspeeds_fp16_and_is_refused_without_a_loss_scale():
    fp16 = {**ds_of("fp32"), "fp16": {"enabled": True, "loss_scale": 0, "loss_scale_window": 1000}}
    fitted, _ = deepspeed_json.configure(fp16, "f.json", 1, cuda=True, loss_scale_window=50)
    assert fitted["fp16"]["loss_scale_window"] == 50
    assert fp16["fp16"]["loss_scale_window"] == 1000
    assert deepspeed_json.configure(fp16, "f.json", 1, cuda=True)[0]["fp16"]["loss_scale_window"] == 1000
    # The autocast mode's window goes to its GradScaler (set_growth_interval), not into the configuration.
    autocast = deepspeed_json.configure(ds_of("autocast-fp16"), "a.json", 1, cuda=True, loss_scale_window=50)[0]
    assert "fp16" not in autocast
    assert deepspeed_json.precision(autocast) == "autocast-fp16"
    for mode in ("bf16", "fp32", "autocast-bf16"):
        with pytest.raises(ValueError, match=f"--loss-scale-window 50: b.json trains in {mode}, which has no loss"):
            deepspeed_json.configure(ds_of(mode), "b.json", 1, cuda=True, loss_scale_window=50)


def test_one_steps_gradients_leave_in_one_fused_all_reduce_per_dtype(process_group):
    """Tensor fusion (Jia et al.): DeepSpeed flattens the gradients into buckets of up to 500M elements before the
    all-reduce, so ResNet-18's 62 gradient tensors leave a rank in one all-reduce per dtype (16-bit weights, fp32
    batch norm), once per optimizer step and not per micro-batch. Counted by DeepSpeed's own comms logger (with
    one rank: the calls and sizes do not depend on the rank count)."""
    import deepspeed.comm.comm as ds_comm

    from pipeline.model import build_model

    model, _ = build_model("resnet18", 10)
    ds = {**ds_of("bf16", batch=8), "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
          "comms_logger": {"enabled": True, "prof_all": True}}  # fmt: skip
    eng = engine.build(model, ds, SCHEDULE)
    params = [p for p in eng.module.parameters() if p.requires_grad]
    logger = ds_comm.comms_logger
    try:
        logged = []
        for _ in range(2):  # two micro-batches: one optimizer step
            logger.comms_dict.clear()
            loss = eng(torch.randn(4, 3, 32, 32).to(torch.bfloat16)).float().square().mean()
            eng.backward(loss)
            eng.step()
            logged.append({size: record[0] for size, record in logger.comms_dict.get("all_reduce", {}).items()})
    finally:
        logger.enabled = False
        logger.comms_dict.clear()
    assert logged[0] == {}  # nothing leaves the rank on the first micro-batch
    numels = {dtype: sum(p.numel() for p in params if p.dtype == dtype) for dtype in {p.dtype for p in params}}
    assert len(params) == 62
    assert set(numels) == {torch.bfloat16, torch.float32}
    # One all-reduce per dtype, each all that dtype's gradients, sent in DeepSpeed's communication type (the 16-bit
    # one unless "communication_data_type" says otherwise: batch norm's fp32 gradients travel in 16 bits too).
    assert eng.communication_data_type == torch.bfloat16
    assert logged[1] == {numel * 2: 1 for numel in numels.values()}
