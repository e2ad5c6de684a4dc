"""The learning-rate schedule: a pure function of the step, equal to DeepSpeed's, and tied to the global step."""

import pytest
import torch
from deepspeed.runtime.lr_schedules import WarmupDecayLR

from pipeline import engine, schedule
from pipeline.scaling import Recipe
from pipeline.schedule import Schedule, StepLR, derive, lr_at
from tests.helpers import small_convnet

# B = 8192 on ImageNet, 90 epochs, 5 of warmup: 157 steps per epoch.
BS8K = Recipe(8192)


def test_derived_numbers():
    s = derive("warmup_decay", BS8K)
    assert (s.base_lr, s.peak_lr, s.steps_per_epoch, s.warmup_steps, s.total_steps) == (0.1, 3.2, 157, 785, 14130)
    g = derive("goyal_steps", BS8K)
    assert g.milestones == (30 * 157, 60 * 157, 80 * 157)
    # Scaled to a shorter run: epochs 30/60/80 of 90 become 6/12/16 of 18 (rounded), in steps of this data.
    assert derive("goyal_steps", Recipe(256, train_images=10_000, epochs=18, warmup_epochs=1)).milestones == (
        6 * 40,
        12 * 40,
        16 * 40,
    )
    small = derive("warmup_decay", Recipe(64, train_images=1000, epochs=10, warmup_epochs=1))
    assert small.base_lr == small.peak_lr == 0.025


@pytest.mark.parametrize(
    "kind, expected",
    [
        # Linear warmup: 0.1 + 3.1 * step / 785, then the decay or the steps.
        ("warmup_decay", {0: 0.1, 1: 0.1 + 3.1 / 785, 392: 0.1 + 3.1 * 392 / 785, 784: 0.1 + 3.1 * 784 / 785,
                          785: 3.2, 786: 0.1 + 3.1 * (14130 - 786) / (14130 - 785), 14129: 0.1 + 3.1 / 13345,
                          14130: 0.1, 20000: 0.1}),
        ("goyal_steps", {0: 0.1, 1: 0.1 + 3.1 / 785, 784: 0.1 + 3.1 * 784 / 785, 785: 3.2, 4709: 3.2, 4710: 0.32,
                         9419: 0.32, 9420: 0.032, 12559: 0.032, 12560: 0.0032, 14129: 0.0032}),
    ],
)  # fmt: skip
def test_boundary_steps(kind, expected):
    s = derive(kind, BS8K)
    for step, lr in expected.items():
        assert lr_at(s, step) == pytest.approx(lr, rel=1e-12), f"{kind} step {step}"


def test_warmup_adds_a_constant_every_step():
    s = derive("goyal_steps", BS8K)
    steps = [lr_at(s, i + 1) - lr_at(s, i) for i in range(s.warmup_steps)]
    assert max(steps) == pytest.approx(min(steps)) == pytest.approx((3.2 - 0.1) / 785)


@pytest.mark.parametrize("warmup_epochs", [0, 1, 2.5])
def test_equals_deepspeed_warmup_decay_at_every_step(warmup_epochs):
    s = derive("warmup_decay", Recipe(1024, train_images=5000, epochs=6, warmup_epochs=warmup_epochs))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ds = WarmupDecayLR(opt, **schedule.deepspeed_params(s))
    for step in range(s.total_steps + 3):
        ds.step(step)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(s, step), rel=1e-12), step


def test_step_lr_state_round_trip():
    s = derive("goyal_steps", Recipe(512, train_images=20_000, epochs=9, warmup_epochs=1))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    first = StepLR(opt, s)
    assert first.get_last_lr() == [lr_at(s, 0)]
    first.step(123)
    again = StepLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), s)
    again.load_state_dict(first.state_dict())
    assert again.get_last_lr() == [lr_at(s, 123)] and again.last_batch_iteration == 123


@pytest.mark.parametrize("kind", ["warmup_decay", "goyal_steps"])
def test_overflow_skip_does_not_shift_the_schedule(process_group, kind):
    """A real bf16 engine skips a step with non-finite gradients; the lr still follows the global step."""
    s = Schedule(kind, 0.1, 0.9, warmup_steps=4, total_steps=12, steps_per_epoch=3, milestones=(6, 9))
    ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
          "optimizer": {"type": "SGD", "params": {"lr": 0.9, "momentum": 0.9, "nesterov": True}}}  # fmt: skip
    ds = engine.with_schedule(ds, s)
    eng = engine.build(torch.nn.Linear(4, 3), ds, s)
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    for step in range(10):
        assert engine.lr(eng) == pytest.approx(lr_at(s, step)), f"step {step}"
        loss = eng(x).float().sum() * (float("inf") if step == 2 else 1.0)
        eng.backward(loss)
        eng.step()
        schedule.follow(eng)
    assert (eng.global_steps, eng.skipped_steps) == (10, 1)
    assert engine.lr(eng) == pytest.approx(lr_at(s, 10))


def test_deepspeed_alone_would_shift_the_schedule(process_group):
    """The trap `follow` exists for: without it, one skipped step leaves DeepSpeed's lr a step behind."""
    s = Schedule("warmup_decay", 0.1, 0.9, warmup_steps=4, total_steps=12, steps_per_epoch=3)
    ds = engine.with_schedule({"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
                               "optimizer": {"type": "SGD", "params": {"lr": 0.9}}}, s)  # fmt: skip
    eng = engine.build(torch.nn.Linear(4, 3), ds, s)
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    for step in range(4):
        eng.backward(eng(x).float().sum() * (float("inf") if step == 1 else 1.0))
        eng.step()
    assert eng.skipped_steps == 1 and engine.lr(eng) != pytest.approx(lr_at(s, 4))
    schedule.follow(eng)
    assert engine.lr(eng) == pytest.approx(lr_at(s, 4))


@pytest.mark.parametrize("nesterov", [False, True])
def test_torch_sgd_needs_no_momentum_correction(nesterov):
    """Goyal et al. section 2.1: with v <- m*v + lr*g, changing lr needs v scaled by lr_new/lr_old. PyTorch keeps
    lr out of the buffer (v <- m*v + g; w <- w - lr*v), which is that corrected rule; it is what the recipe uses."""
    torch.manual_seed(0)
    lrs = [0.1, 0.1, 0.4, 0.8, 1.6, 1.6, 0.16, 0.016]
    target = torch.randn(5)
    w = torch.nn.Parameter(torch.zeros(5))
    opt = torch.optim.SGD([w], lr=lrs[0], momentum=0.9, nesterov=nesterov)
    corrected, plain = torch.zeros(5), torch.zeros(5)
    v_corr, v_plain, prev = torch.zeros(5), torch.zeros(5), lrs[0]
    for lr in lrs:
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        ((w - target) ** 2).sum().backward()
        opt.step()
        # Goyal's form with lr inside the buffer, with and without the momentum correction lr/prev.
        g_corr, g_plain = 2 * (corrected - target), 2 * (plain - target)
        v_corr = 0.9 * v_corr * (lr / prev) + lr * g_corr
        v_plain = 0.9 * v_plain + lr * g_plain
        corrected = corrected - (lr * g_corr + 0.9 * v_corr if nesterov else v_corr)
        plain = plain - (lr * g_plain + 0.9 * v_plain if nesterov else v_plain)
        prev = lr
    assert torch.allclose(w.detach(), corrected, atol=1e-5)
    assert not torch.allclose(w.detach(), plain, atol=1e-2)


@pytest.mark.slow
def test_a_compiled_engine_trains_and_keeps_plain_parameter_names(process_group):
    """--compile: torch.compile through DeepSpeed's engine.compile, in place, so checkpoints keep their names."""
    s = Schedule("warmup_decay", 0.1, 0.1, warmup_steps=0, total_steps=4, steps_per_epoch=2)
    ds = engine.with_schedule({"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2,
                               "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}, s)  # fmt: skip
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    eng = engine.build(model, ds, s, compile_mode="default")
    assert eng.is_compiled
    x, before = torch.randn(2, 4), model[0].weight.detach().clone()
    for _ in range(2):
        eng.backward(eng(x).sum())
        eng.step()
    assert not torch.equal(model[0].weight, before)
    assert set(eng.module.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}


@pytest.mark.parametrize("fused", [False, True])
def test_channels_last_weights_train_like_contiguous_ones(process_group, fused):
    """DeepSpeed's first broadcast refuses channels-last weights, so they are converted after initialize, fp32
    master copies included: fused SGD walks masters, grads and momenta as flat memory, and silently misapplies
    the update when their layouts differ."""
    s = Schedule("warmup_decay", 0.1, 0.1, warmup_steps=0, total_steps=8, steps_per_epoch=4)
    ds = engine.with_schedule({"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True},
                               "data_types": {"buffer_dtype": "bf16"}, "optimizer": {"type": "SGD", "params": {
                                   "lr": 0.1, "momentum": 0.9, "nesterov": True, "fused": fused}}}, s)  # fmt: skip
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    masters = {}
    for channels_last in (False, True):
        eng = engine.build(small_convnet(), ds, s, channels_last=channels_last)
        conv = eng.module[0].weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        images = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        for _ in range(3):
            eng.backward(eng(images).float().square().mean())
            eng.step()
        masters[channels_last] = [p.detach().clone() for g in eng.optimizer.fp32_groups for p in g]
        assert masters[channels_last][0].is_contiguous(memory_format=torch.channels_last) == channels_last
        assert eng.global_steps == 3 and eng.skipped_steps == 0
    for a, b in zip(masters[False], masters[True], strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("batch,warmup_epochs", [(64, 0.0), (256, 5.0), (1024, 0.0), (8192, 5.0)])
def test_committed_configs_and_runs_build_the_same_scheduler(batch, warmup_epochs):
    """The generated DeepSpeed file and a run's engine get WarmupDecayLR's parameters from one function, so they
    agree, no-warmup recipes included."""
    from pipeline import scaling
    from pipeline.schedule import deepspeed_params, derive

    r = scaling.Recipe(batch, 32, epochs=10, warmup_epochs=warmup_epochs, train_images=5000)
    params = scaling.ds_config(r)["scheduler"]["params"]
    assert params == deepspeed_params(derive("warmup_decay", r))
    assert params["warmup_type"] == "linear" and params["warmup_num_steps"] == max(1, r.warmup_steps)
