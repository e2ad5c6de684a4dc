"""The learning-rate schedule: DeepSpeed's WarmupDecayLR from the committed configurations and the paper's steps,
each equal at every boundary step to the formulas written out here (not taken from DeepSpeed or our code); fitted
to the run's data and epochs; built by DeepSpeed inside the engine; drawn as lr.png; tied to the global step."""

import json
from pathlib import Path

import pytest
import torch

from pipeline import deepspeed_json, engine, schedule
from pipeline.scaling import CONFIGS, Recipe, ds_config
from pipeline.schedule import RunSteps, fit, lr_at

DS_CONFIGS = Path(__file__).parent.parent / "ds_configs"
IMAGENET = 1_281_167


def steps(batch: int, images: int = IMAGENET, epochs: int = 90, warmup: float | None = None) -> RunSteps:
    """A run of `batch` on `images` training images for `epochs`, with the reference anchor 0.1 at 256."""
    return RunSteps(batch, images, epochs, warmup, 256, 0.1)


def committed(name: str) -> dict:
    return json.loads((DS_CONFIGS / f"{name}.json").read_text())


def fitted(name: str, run: RunSteps, kind: str = "deepspeed", ds: dict | None = None):
    return fit(kind, ds if ds is not None else committed(name), f"{name}.json", run)


def goyal(step: int, batch: int, per_epoch: int, epochs: int = 90) -> float:
    """Goyal et al. section 2.2 and 5.1, written out: lr 0.1 * B / 256 after 5 epochs of gradual warmup that starts at
    0.1 and adds a constant every iteration (none for B <= 256), then x0.1 at epochs 30, 60 and 80 of 90."""
    peak, warmup = 0.1 * batch / 256, 5 * per_epoch if batch > 256 else 0
    if step < warmup:
        return 0.1 + (peak - 0.1) * step / warmup
    return peak * 0.1 ** sum(step >= e * per_epoch * epochs // 90 for e in (30, 60, 80))


def linear_from_0_to_0(step: int, batch: int, per_epoch: int, epochs: int = 90) -> float:
    """The design's schedule written out: from 0, the same constant added every step for 5 epochs up to
    0.1 * B / 256, then a straight line down to 0 at the end of the last epoch."""
    peak, warmup, end = 0.1 * batch / 256, 5 * per_epoch, epochs * per_epoch
    if step < warmup:
        return peak * step / warmup
    return peak * (end - step) / (end - warmup)


# ImageNet's 1,281,167 images: 157 optimizer steps per epoch at B = 8192, 1252 at 1024, 5005 at 256, 20019 at 64.
@pytest.mark.parametrize("name, batch, per_epoch", [("bs8k", 8192, 157), ("bs1k", 1024, 1252), ("bs256", 256, 5005),
                                                    ("cpu", 64, 20019)])  # fmt: skip
@pytest.mark.parametrize("kind, formula", [("deepspeed", linear_from_0_to_0), ("goyal_steps", goyal)])
def test_every_boundary_step_follows_the_formula(kind, formula, name, batch, per_epoch):
    s, _, notes = fitted(name, steps(batch), kind)
    assert (s.steps_per_epoch, s.total_steps) == (per_epoch, 90 * per_epoch)
    assert s.kind == ("WarmupDecayLR" if kind == "deepspeed" else "goyal_steps")
    assert notes == ([] if kind == "deepspeed" else [f"{name}.json: its scheduler (WarmupDecayLR) is not used: "
                                                     "--schedule goyal_steps"])  # fmt: skip
    boundaries = {0, 1, 5 * per_epoch - 1, 5 * per_epoch, 5 * per_epoch + 1, 90 * per_epoch - 1, 90 * per_epoch}
    boundaries |= {e * per_epoch + d for e in (30, 60, 80) for d in (-1, 0, 1)}
    for step in sorted(boundaries):
        assert lr_at(s, step) == pytest.approx(formula(step, batch, per_epoch), rel=1e-12, abs=1e-15), step


def test_the_committed_warmup_decay_lr_differs_from_the_papers_only_in_its_first_warmup_steps():
    """B = 8192 on ImageNet: 0 at step 0 (the paper: 0.1), 1.598 at step 392 (1.648), the same from step 785 on."""
    s, _, _ = fitted("bs8k", steps(8192))
    paper, _, _ = fitted("bs8k", steps(8192), "goyal_steps")
    assert (lr_at(s, 0), lr_at(paper, 0)) == (0.0, pytest.approx(0.1))
    assert (lr_at(s, 392), lr_at(paper, 392)) == pytest.approx((3.2 * 392 / 785, 0.1 + 3.1 * 392 / 785))
    assert lr_at(s, 785) == lr_at(paper, 785) == pytest.approx(3.2)
    assert lr_at(s, 14130) == 0
    assert s.describe() == (
        "WarmupDecayLR (DeepSpeed): warmup_min_lr 0, warmup_max_lr 3.2, warmup_num_steps 785, warmup_type linear, "
        "total_num_steps 14130; peak 3.2, end 0; 14130 steps (157 per epoch)"
    )


def test_the_papers_steps_scale_to_a_shorter_run():
    # Epochs 30/60/80 of 90 become 6/12/16 of 18 (rounded), in steps of this data; B = 256 has no warmup.
    g, _, _ = fitted("bs256", steps(256, images=10_000, epochs=18, warmup=1), "goyal_steps")
    assert g.milestones == (6 * 40, 12 * 40, 16 * 40)
    assert g.warmup_steps == 0
    assert "lr 0.1 from the first step (no warmup" in g.describe()
    assert "peak 0.1, end 0.0001;" in g.describe()


def test_fitting_keeps_each_count_a_share_of_the_run():
    """The file counts 90 epochs of ImageNet; a run on other data or epochs gets the same shares of its own steps:
    warmup 5 / 90 of the run (the recipe's 5 epochs of 90), the decay's end at the last step."""
    s, ds, notes = fitted("bs8k", steps(8192, epochs=30))
    assert (s.params["warmup_num_steps"], s.params["total_num_steps"], s.total_steps) == (262, 4710, 4710)
    assert ds["scheduler"] == {"type": "WarmupDecayLR", "params": s.params}
    assert notes == [
        "bs8k.json: WarmupDecayLR fitted to this run (1,281,167 training images, 30 epochs: 4710 steps; the file "
        "counts 14130: 90 epochs of ImageNet's 1,281,167 at B=8192): warmup_num_steps 785 -> 262, total_num_steps "
        "14130 -> 4710"
    ]
    # The built-in dataset's 2,000 images at B = 64: 32 steps per epoch, 8 epochs.
    s, _, _ = fitted("cpu", steps(64, images=2000, epochs=8))
    assert (s.params["warmup_num_steps"], s.total_steps) == (round(256 * 5 / 90), 256)
    assert lr_at(s, 256) == 0
    # On the run the file was made for, nothing changes and nothing is said.
    assert fitted("bs1k", steps(1024))[2] == []


def test_a_hand_edit_takes_effect_and_keeps_its_share():
    """Edits in the JSON are DeepSpeed's parameters as written on ImageNet at 90 epochs (10 epochs of warmup, a
    floor of 0.1, a peak of 2); on a shorter run the warmup stays a ninth of it."""
    ds = committed("bs8k")
    ds["scheduler"]["params"].update(warmup_num_steps=1570, warmup_min_lr=0.1, warmup_max_lr=2.0)
    s, _, notes = fitted("bs8k", steps(8192), ds=ds)
    assert notes == []
    assert (lr_at(s, 0), lr_at(s, 1570), s.end_lr) == pytest.approx((0.1, 2.0, 0.1))
    s, _, _ = fitted("bs8k", steps(8192, epochs=45), ds=ds)
    assert (s.params["warmup_num_steps"], s.total_steps) == (785, 7065)
    # --warmup-epochs sets the warmup itself, in epochs of this run.
    s, _, notes = fitted("bs8k", steps(8192, epochs=45, warmup=2), ds=ds)
    assert s.params["warmup_num_steps"] == 314
    assert "warmup_num_steps 1570 -> 314" in notes[0]


def test_a_warmup_as_long_as_the_run_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^WarmupDecayLR: warmup_num_steps 32 is the whole run \(32 steps\); lower"):
        fitted("cpu", steps(64, images=2000, epochs=1, warmup=0.99))
    with pytest.raises(ValueError, match=r"^--warmup-epochs 0.99: 4 warmup steps are the whole run \(4 steps\)"):
        fitted("bs1k", steps(512, images=2000, epochs=1, warmup=0.99), "goyal_steps")
    ds = committed("bs8k")
    ds["scheduler"]["params"]["warmup_num_steps"] = 14130
    with pytest.raises(ValueError, match="warmup_num_steps 14130 is the whole run"):
        fitted("bs8k", steps(8192), ds=ds)


def test_deepspeeds_least_warmup_is_two_steps():
    """DeepSpeed refuses 0 warmup steps and warms up over 2 where given 1: a shorter warmup is raised to 2."""
    s, _, notes = fitted("cpu", steps(64, images=2000, epochs=8, warmup=0))
    assert s.params["warmup_num_steps"] == 2
    assert "warmup_num_steps 100095 -> 2" in notes[0]
    assert [lr_at(s, n) for n in (0, 1, 2)] == pytest.approx([0, 0.0125, 0.025])


def test_what_a_file_leaves_out_or_cannot_have():
    ds = committed("bs8k")
    del ds["scheduler"]
    s, fitted_ds, notes = fitted("bs8k", steps(8192), ds=ds)
    assert notes == ["bs8k.json: no scheduler; using the linear scaling rule's WarmupDecayLR (as ds_configs/ hold)"]
    assert fitted_ds["scheduler"] == committed("bs8k")["scheduler"]
    ds = committed("bs8k")
    del ds["scheduler"]["params"]["warmup_type"]
    s, _, notes = fitted("bs8k", steps(8192), ds=ds)
    assert notes == ["bs8k.json: WarmupDecayLR without warmup_type warms up logarithmically (DeepSpeed's default), "
                     "not linearly"]  # fmt: skip
    assert lr_at(s, 392) == pytest.approx(3.2 * torch.log(torch.tensor(393.0)).item() / torch.log(torch.tensor(785.0)))
    for kind in ("LRRangeTest", "CosineAnnealingLR"):
        ds["scheduler"]["type"] = kind
        with pytest.raises(ValueError, match=f"^bs8k.json: scheduler type '{kind}': use one of WarmupDecayLR, Warm"):
            fitted("bs8k", steps(8192), ds=ds)


def test_the_linear_scaling_rule_follows_the_reference_flags_but_not_a_hand_set_peak():
    s, ds, _ = fit("deepspeed", committed("bs8k"), "bs8k.json", RunSteps(8192, IMAGENET, 90, None, 256, 0.2))
    assert (s.params["warmup_max_lr"], ds["optimizer"]["params"]["lr"]) == (6.4, 6.4)
    edited = committed("bs8k")
    edited["scheduler"]["params"]["warmup_max_lr"] = 2.5
    s, _, _ = fit("deepspeed", edited, "bs8k.json", RunSteps(8192, IMAGENET, 90, None, 256, 0.2))
    assert s.peak_lr == 2.5


OTHER_TYPES = {
    "WarmupLR": {"warmup_min_lr": 0.0, "warmup_max_lr": 3.2, "warmup_num_steps": 785, "warmup_type": "linear"},
    "WarmupCosineLR": {
        "total_num_steps": 14130,
        "warmup_num_steps": 785,
        "warmup_min_ratio": 0.0,
        "cos_min_ratio": 0.0,
        "warmup_type": "linear",
    },  # fmt: skip
    "OneCycle": {"cycle_min_lr": 0.32, "cycle_max_lr": 3.2, "cycle_first_step_size": 7065, "decay_step_size": 0},
}


@pytest.mark.parametrize("kind", list(OTHER_TYPES))
def test_deepspeeds_other_schedulers_are_fitted_and_built_by_deepspeed(process_group, kind):
    """The run's schedule, fitted to 30 epochs of ImageNet, is what the engine DeepSpeed built from the configuration
    sets, step by step; each type's own shape is checked at its corners."""
    ds = {**ds_config(CONFIGS["bs8k"]), "scheduler": {"type": kind, "params": OTHER_TYPES[kind]}}
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] = 2
    ds.pop("fp16")
    ds["optimizer"]["params"].pop("fused")
    s, ds, notes = fit("deepspeed", ds, "mine.json", steps(8192, epochs=30))
    ds["train_batch_size"] = 2
    assert s.total_steps == 4710
    counts = {k: v for k, v in s.params.items() if k in schedule.STEP_COUNTS[kind] and v}
    assert counts == {k: round(v / 3) for k, v in OTHER_TYPES[kind].items() if k in counts}
    eng = engine.build(torch.nn.Linear(4, 3), ds, s)
    assert type(eng.lr_scheduler).__name__ == kind
    for step in [0, 1, 100, 261, 262, 263, 2355, 4709, 4710]:
        eng.lr_scheduler.step(step)
        assert engine.lr(eng) == lr_at(s, step), step
    if kind == "WarmupLR":
        assert (lr_at(s, 131), lr_at(s, 4000)) == pytest.approx((1.6, 3.2))
    elif kind == "WarmupCosineLR":
        mid = 262 + (4710 - 262) // 2
        assert (lr_at(s, 262), lr_at(s, mid), lr_at(s, 4710)) == pytest.approx((3.2, 1.6, 0), abs=2e-3)
    else:
        up, top, down = lr_at(s, 0), lr_at(s, 2354), lr_at(s, 4708)
        assert (up, top, down, s.end_lr) == pytest.approx((0.32 + 2.88 / 2355, 3.2, 0.32 + 2.88 / 2355, 0.32))


def test_the_run_draws_its_schedule(tmp_path):
    """lr.png: a small picture of the whole schedule, its corners exact (steps either side of every milestone)."""
    s, _, _ = fitted("bs8k", steps(8192), "goyal_steps")
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
    steps_drawn = schedule._plot_steps(s)
    assert {0, 785, 14130, 4709, 4710, 9419, 9420, 12559, 12560} <= set(steps_drawn)
    assert len(steps_drawn) < 2200
    # An edit in the JSON shows in the picture: a floor of 1.6 keeps the curve at half height at the end.
    ds = committed("bs8k")
    ds["scheduler"]["params"]["warmup_min_lr"] = 1.6
    edited, _, _ = fitted("bs8k", steps(8192), ds=ds)
    schedule.plot(edited, tmp_path / "edited.png")
    with Image.open(tmp_path / "edited.png") as image:
        pixels = image.convert("RGB").load()
    assert any(pixels[round(x(14000)), round(y(1.6)) + d] == blue for d in (-1, 0, 1))


def test_goyal_steps_state_round_trip():
    s, _, _ = fitted("bs8k", steps(512, images=20_000, epochs=9, warmup=1), "goyal_steps")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    first = schedule.GoyalSteps(opt, s)
    assert first.get_last_lr() == [lr_at(s, 0)]
    first.step(123)
    again = schedule.GoyalSteps(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), s)
    again.load_state_dict(first.state_dict())
    assert again.get_last_lr() == [lr_at(s, 123)]
    assert again.last_batch_iteration == 123


def small_schedule(kind: str) -> schedule.Schedule:
    """12 steps of B = 2 on 6 images, 4 of warmup: WarmupDecayLR from 0 to 0.9, or the paper's from 0.1."""
    run = RunSteps(2, 6, 4, 4 / 3, 2, 0.9)
    return fit(kind, ds_config(Recipe(2, 2, "fp32", fused=False)), "b2.json", run)[0]


@pytest.mark.parametrize("kind", ["deepspeed", "goyal_steps"])
def test_overflow_skip_does_not_shift_the_schedule(process_group, kind):
    """A real bf16 engine skips a step with non-finite gradients; the lr still follows the global step."""
    s = small_schedule(kind)
    ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
          "optimizer": {"type": "SGD", "params": {"lr": 0.9, "momentum": 0.9, "nesterov": True}}}  # fmt: skip
    eng = engine.build(torch.nn.Linear(4, 3), deepspeed_json.with_schedule(ds, s), s)
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
    s = small_schedule("deepspeed")
    ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
          "optimizer": {"type": "SGD", "params": {"lr": 0.9}}}  # fmt: skip
    ds = deepspeed_json.with_schedule(ds, s)
    eng = engine.build(torch.nn.Linear(4, 3), ds, s)
    assert type(eng.lr_scheduler).__name__ == "WarmupDecayLR"
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    for step in range(4):
        eng.backward(eng(x).float().sum() * (float("inf") if step == 1 else 1.0))
        eng.step()
    assert eng.skipped_steps == 1
    assert engine.lr(eng) != pytest.approx(lr_at(s, 4))
    schedule.follow(eng)
    assert engine.lr(eng) == pytest.approx(lr_at(s, 4))


class Point(torch.nn.Module):
    """One parameter whose forward pass is itself: a loss of it is the whole model."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(5))

    def forward(self, target):
        return ((self.w - target) ** 2).sum() / 4


@pytest.mark.parametrize("nesterov", [False, True])
def test_the_engine_needs_no_momentum_correction(process_group, nesterov):
    """Goyal et al. section 2.1: with v <- m*v + lr*g, changing lr needs v scaled by lr_new/lr_old. The engine's
    SGD (through DeepSpeed, its lr from WarmupDecayLR rising then falling) moves the weights as that corrected rule,
    written out here, does; the uncorrected rule would move them elsewhere."""
    params = {"warmup_min_lr": 0.2, "warmup_max_lr": 1.6, "warmup_num_steps": 4, "total_num_steps": 12,
              "warmup_type": "linear"}  # fmt: skip
    s = schedule.Schedule("WarmupDecayLR", params, total_steps=12, steps_per_epoch=3, optimizer_lr=1.6)
    ds = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_clipping": 0.0,
          "optimizer": {"type": "SGD", "params": {"momentum": 0.9, "nesterov": nesterov}}}  # fmt: skip
    eng = engine.build(Point(), deepspeed_json.with_schedule(ds, s), s)
    target = torch.randn(5, generator=torch.Generator().manual_seed(0))
    corrected, plain = torch.zeros(5), torch.zeros(5)
    v_corr, v_plain, prev = torch.zeros(5), torch.zeros(5), 0.2
    lrs = []
    for _ in range(9):
        lr = engine.lr(eng)
        lrs.append(lr)
        eng.backward(eng(target))
        eng.step()
        schedule.follow(eng)
        # Goyal's form with lr inside the buffer, with and without the momentum correction lr/prev.
        g_corr, g_plain = (corrected - target) / 2, (plain - target) / 2
        v_corr = 0.9 * v_corr * (lr / prev) + lr * g_corr
        v_plain = 0.9 * v_plain + lr * g_plain
        corrected = corrected - (lr * g_corr + 0.9 * v_corr if nesterov else v_corr)
        plain = plain - (lr * g_plain + 0.9 * v_plain if nesterov else v_plain)
        prev = lr
    assert lrs == pytest.approx([0.2, 0.55, 0.9, 1.25, 1.6, 1.425, 1.25, 1.075, 0.9])
    assert torch.allclose(eng.module.w.detach(), corrected, atol=1e-5)
    assert not torch.allclose(eng.module.w.detach(), plain, atol=1e-2)
