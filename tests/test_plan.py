"""python -m pipeline.plan: the linear scaling rule's recipe for N GPUs and the stated time model."""

import math
from pathlib import Path

import pytest

from pipeline import config, plan
from pipeline.data.augment import ResolutionRamp
from pipeline.scaling import Recipe


def test_the_recipe_at_each_gpu_count_is_the_rules():
    c = plan.Cluster()
    for gpus in (8, 64, 256, 1024):
        p = plan.project(gpus, None, 32, c)
        rule = Recipe(32 * gpus)
        assert (p.recipe.batch_size, p.accumulation, p.recipe.peak_lr) == (32 * gpus, 1, 0.1 * 32 * gpus / 256)
        assert (p.recipe.warmup_steps, p.recipe.steps_per_epoch) == (rule.warmup_steps, rule.steps_per_epoch)
    on_8 = plan.project(8, 8192, 32, c)
    assert on_8.accumulation == 32
    assert on_8.recipe.steps_per_epoch == 157
    assert on_8.compute_s == pytest.approx(32 * 32 / 2470)
    with pytest.raises(ValueError, match="--batch-size 1000: not a multiple of micro-batch 32 x 8 GPUs"):
        plan.project(8, 1000, 32, c)


def test_the_time_model():
    c = plan.Cluster(images_per_sec=1000, bandwidth_gbps=100, hop_latency_s=0, overlap=0)
    # A ring all-reduce moves 2 (N-1)/N of the gradient bytes through each link.
    assert plan.allreduce_seconds(1, c) == 0
    assert plan.allreduce_seconds(4, c) == pytest.approx(1.5 * plan.RESNET50_PARAMS * 2 * 8 / 100e9)
    faster = plan.Cluster(images_per_sec=1000, bandwidth_gbps=200, hop_latency_s=0, overlap=0)
    assert plan.allreduce_seconds(4, faster) == pytest.approx(plan.allreduce_seconds(4, c) / 2)
    slow = plan.project(64, None, 32, c)
    assert slow.step_s == pytest.approx(0.032 + slow.allreduce_s)
    assert slow.exposed_s == slow.allreduce_s
    # Overlap hides the all-reduce behind the backward pass (2/3 of a micro-step), never more than that lasts.
    hidden = plan.project(64, None, 32, plan.Cluster(images_per_sec=1000, hop_latency_s=0, overlap=1.0))
    assert hidden.exposed_s == pytest.approx(max(0.0, hidden.allreduce_s - 2 / 3 * 0.032))
    assert hidden.epoch_s == pytest.approx(hidden.recipe.steps_per_epoch * hidden.step_s)
    assert hidden.total_s == pytest.approx(90 * hidden.epoch_s)


def test_the_table_and_its_errors(capsys):
    assert plan.main(["--gpus", "8,256", "--images-per-sec", "3000", "--bandwidth-gbps", "200"]) == 0
    out = capsys.readouterr().out
    assert sum(line.startswith("| ") for line in out.splitlines()) == 4
    assert "| 256 P100s, Goyal et al. (measured) | 8,192 |" in out
    assert "| 1h |" in out
    assert "| 8 | 256 | 1 | 0.1 | 25,025 | 5,005 |" in out
    assert "Model: 3,000 img/s per GPU, ring all-reduce of 25.6M fp16 gradients at 200 Gb/s per GPU" in out
    assert plan.main(["--overlap", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: --overlap must lie in [0, 1]")


RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("epochs, ramp, anchor", [(16, (11, 13), "73.8%"), (24, (17, 20), "75.6%"),
                                                  (32, (23, 27), "76.6%"), (40, (29, 34), "77.2%"),
                                                  (88, (65, 76), "78.4%")])  # fmt: skip
def test_the_budgeted_recipes_are_ffcvs_with_the_rules_lr(epochs, ramp, anchor):
    """Each budgeted recipe loads as run options: FFCV's epochs, ramp (160 to 192), validation (256 of 292, mirror
    images), BlurPool, label smoothing and 2 warmup epochs; its lr is the linear scaling rule's, and it names the
    anchor it follows."""
    path = RECIPES / f"rn50-{epochs}.yaml"
    text = path.read_text()
    assert f"rn50_{epochs}_epochs.yaml" in text and anchor in text
    run = config.load(["--config", str(path), "--data-dir", "d"])
    assert (run.schedule.epochs, run.schedule.warmup_epochs, run.schedule.schedule) == (epochs, 2, "deepspeed")
    assert run.data.ramp == ResolutionRamp(160, 192, *ramp)
    assert (run.data.val_crop, run.data.val_resize, run.tracking.val_flip) == (256, 292, True)
    assert (run.model.blurpool, run.model.label_smoothing, run.model.arch) == (True, 0.1, "resnet50")
    ds = config.read_ds_config(str(RECIPES.parent / run.deepspeed.deepspeed_config))
    assert ds["scheduler"]["params"]["warmup_max_lr"] == pytest.approx(0.1 * ds["train_batch_size"] / 256)


def test_the_papers_recipe_is_the_default_run_with_its_steps():
    run = config.load(["--config", str(RECIPES / "goyal-90.yaml"), "--data-dir", "d"])
    default = config.load(["--data-dir", "d", "--deepspeed_config", "ds_configs/bs8k.json"])
    assert run.data == default.data and run.model == default.model and run.tracking == default.tracking
    assert (run.schedule.epochs, run.schedule.schedule, run.schedule.warmup_epochs) == (90, "goyal_steps", 5)


def test_the_plan_of_a_recipe_times_each_epoch_at_its_crop(capsys, monkeypatch):
    """Epochs before the ramp run at 160 px, after it at 192: with stated rates per side the time is the sum over
    epochs of steps x step time at that epoch's rate (written out here)."""
    monkeypatch.chdir(RECIPES.parent)
    assert plan.main(["--recipe", "recipes/rn50-16.yaml", "--gpus", "8", "--images-per-sec-at", "160:4000,192:3000",
                      "--bandwidth-gbps", "1e9", "--hop-latency-us", "0"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "recipes/rn50-16.yaml: B=1024, 16 epochs, 2 warmup; per GPU 160 px: 4,000 img/s, 192 px: 3,000 img/s" in out
    steps = math.ceil(plan.IMAGENET_TRAIN_IMAGES / 1024)
    # Epochs 0-11 at 160 px, 12 at 176 rounded to 192 (FFCV's rounding), 13-15 at 192.
    expected = steps * (12 * 1024 / 8 / 4000 + 4 * 1024 / 8 / 3000)
    p = plan.project(8, 1024, 32, plan.Cluster(bandwidth_gbps=1e9, hop_latency_s=0), 16, 2,
                     [4000] * 12 + [3000] * 4)  # fmt: skip
    assert p.total_s == pytest.approx(expected, rel=1e-6)
    assert f"| {plan._duration(expected)} |" in out
    assert plan.main(["--recipe", "recipes/rn50-16.yaml", "--images-per-sec-at", "160=4000"]) == 2
    assert "write side:images_per_sec pairs" in capsys.readouterr().err
