"""python -m pipeline.plan: the linear scaling rule's recipe for N GPUs and the stated time model."""

import pytest

from pipeline import plan
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
