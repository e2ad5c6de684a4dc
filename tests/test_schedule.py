"""The learning-rate schedule: a pure function of the step that equals the paper's formulas (written out here,
not taken from DeepSpeed), drawn as the run's lr.png, and tied to the global step."""

import pytest
import torch

from pipeline import engine, schedule
from pipeline.scaling import Recipe
from pipeline.schedule import LRSchedule, Schedule, derive, lr_at
from tests.models import small_convnet

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
    assert small.warmup_steps == 0


def goyal(step: int, batch: int, per_epoch: int, epochs: int = 90) -> float:
    """Goyal et al. section 2.2 and 5.1, written out: lr 0.1 * B / 256 after 5 epochs of gradual warmup that starts at
    0.1 and adds a constant every iteration (none for B <= 256), then x0.1 at epochs 30, 60 and 80 of 90."""
    peak, warmup = 0.1 * batch / 256, 5 * per_epoch if batch > 256 else 0
    if step < warmup:
        return 0.1 + (peak - 0.1) * step / warmup
    return peak * 0.1 ** sum(step >= e * per_epoch * epochs // 90 for e in (30, 60, 80))


def linear_to_zero(step: int, batch: int, per_epoch: int, epochs: int = 90) -> float:
    """The same warmup, then a straight line from the peak to 0 at the end of the last epoch."""
    peak, warmup, end = 0.1 * batch / 256, 5 * per_epoch if batch > 256 else 0, epochs * per_epoch
    if step < warmup:
        return 0.1 + (peak - 0.1) * step / warmup
    return peak * (end - step) / (end - warmup)


# ImageNet's 1,281,167 images: 157 optimizer steps per epoch at B = 8192, 1252 at 1024, 5005 at 256, 20019 at 64.
@pytest.mark.parametrize("batch, per_epoch", [(8192, 157), (1024, 1252), (256, 5005), (64, 20019)])
@pytest.mark.parametrize("kind, formula", [("warmup_decay", linear_to_zero), ("goyal_steps", goyal)])
def test_every_boundary_step_follows_the_paper(kind, formula, batch, per_epoch):
    s = derive(kind, Recipe(batch))
    assert (s.steps_per_epoch, s.total_steps) == (per_epoch, 90 * per_epoch)
    warmup = 5 * per_epoch if batch > 256 else 0
    boundaries = {0, 1, warmup - 1, warmup, warmup + 1, 90 * per_epoch - 1, 90 * per_epoch}
    boundaries |= {e * per_epoch + d for e in (30, 60, 80) for d in (-1, 0, 1)}
    for step in sorted(b for b in boundaries if b >= 0):
        assert lr_at(s, step) == pytest.approx(formula(step, batch, per_epoch), rel=1e-12, abs=1e-15), step


def test_the_schedule_ends_where_the_recipe_does():
    """warmup_decay reaches 0 at the end of training, also at or below B = 256; goyal_steps ends at peak x 0.001
    (0.0032 at B = 8192). Both peak at 0.1 * B / 256."""
    for batch in (64, 256, 8192):
        s, g = derive("warmup_decay", Recipe(batch)), derive("goyal_steps", Recipe(batch))
        assert s.peak_lr == g.peak_lr == pytest.approx(0.1 * batch / 256)
        assert s.end_lr == 0
        assert lr_at(s, s.total_steps - 1) == pytest.approx(s.peak_lr / (s.total_steps - s.warmup_steps))
        assert g.end_lr == pytest.approx(g.peak_lr * 0.001)
        assert lr_at(s, s.total_steps // 2) < lr_at(s, s.warmup_steps)  # a batch at or below 256 decays too
    line = derive("warmup_decay", Recipe(8192)).describe()
    assert "lr 0.1 -> 3.2 over 785 warmup steps, then linearly to 0 at step 14130; peak 3.2, end 0;" in line
    small = derive("warmup_decay", Recipe(64, train_images=1000, epochs=8)).describe()
    assert "lr 0.025 from the first step (no warmup" in small
    assert "peak 0.025, end 0;" in small


def test_the_run_draws_its_schedule(tmp_path):
    """lr.png: a small picture of the whole schedule, its corners exact (steps either side of every milestone)."""
    s = derive("goyal_steps", Recipe(8192))
    schedule.plot(s, tmp_path / "lr.png")
    from PIL import Image

    with Image.open(tmp_path / "lr.png") as image:
        assert image.format == "PNG"
        assert image.size == (400, 220)
        pixels = image.convert("RGB").load()
    # The curve's colour where the lr is: at the peak (end of warmup), and a tenth of it after the first drop.
    blue = (31, 119, 180)
    x = lambda step: 46 + (400 - 12 - 46) * step / 14130  # noqa: E731
    y = lambda lr: 190 - (190 - 24) * lr / 3.2  # noqa: E731
    assert any(pixels[round(x(2000)), round(y(3.2)) + d] == blue for d in (-1, 0, 1))
    assert any(pixels[round(x(5000)), round(y(0.32)) + d] == blue for d in (-1, 0, 1))
    steps = schedule._plot_steps(s)
    assert {0, 785, 14130, 4709, 4710, 9419, 9420, 12559, 12560} <= set(steps)
    assert len(steps) < 2200


def test_warmup_adds_a_constant_every_step():
    s = derive("goyal_steps", BS8K)
    steps = [lr_at(s, i + 1) - lr_at(s, i) for i in range(s.warmup_steps)]
    assert max(steps) == pytest.approx(min(steps)) == pytest.approx((3.2 - 0.1) / 785)


def test_step_lr_state_round_trip():
    s = derive("goyal_steps", Recipe(512, train_images=20_000, epochs=9, warmup_epochs=1))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    first = LRSchedule(opt, s)
    assert first.get_last_lr() == [lr_at(s, 0)]
    first.step(123)
    again = LRSchedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), s)
    again.load_state_dict(first.state_dict())
    assert again.get_last_lr() == [lr_at(s, 123)]
    assert again.last_batch_iteration == 123


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
    assert eng.skipped_steps == 1
    assert engine.lr(eng) != pytest.approx(lr_at(s, 4))
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
        assert eng.global_steps == 3
        assert eng.skipped_steps == 0
    for a, b in zip(masters[False], masters[True], strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
