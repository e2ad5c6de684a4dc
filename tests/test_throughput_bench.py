"""bench/throughput.py: how steps become timed windows, and a whole harness run on the CPU (every measurement in
its own process: DALI alone, synthetic input through train.py's loop, train.py end to end, plain PyTorch AMP)."""

import json
from types import SimpleNamespace

import pytest
import torch

from bench import children, throughput
from bench import windows as timing


def rows_for(steps: int, rate=lambda s: float(s)) -> list[dict]:
    """Per-step rows like steps.jsonl, each step's rate given by `rate`."""
    return [{"step": s, "images_per_sec": rate(s)} for s in range(1, steps + 1)]


def test_windows_are_closed_like_train_py_every_window_steps_and_at_epoch_ends(monkeypatch):
    # A clock that moves 1, 2, 4, ... s between the reads: each window's rate says which steps it closed over (a real
    # clock let two windows of a fast machine share a rate).
    reads = iter([0.0, 1.0, 3.0, 7.0, 15.0, 31.0, 63.0])
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: next(reads)))
    clock = timing.Windows(window=2, images_per_step=10, steps_per_epoch=5, gpu=False)
    for step in range(1, 11):
        clock.step(step)
    # Flush points at multiples of 2 and at the epoch end, step 5: {1,2} {3,4} {5} {6} {7,8} {9,10}.
    windows = [([1, 2], 20 / 1), ([3, 4], 20 / 2), ([5], 10 / 4), ([6], 10 / 8), ([7, 8], 20 / 16), ([9, 10], 20 / 32)]
    assert clock.rows == [{"step": s, "images_per_sec": rate} for steps, rate in windows for s in steps]


def test_steady_rates_keep_full_windows_that_open_no_epoch_after_warmup():
    # Windows of 2 in epochs of 5: {1,2} opens epoch 0, {5} and {6} are partial, {6} also opens epoch 1.
    rows = rows_for(10, rate=lambda s: 100.0 + (s - 1) // 2)
    assert timing.steady_rates(rows, steps_per_epoch=5, window=2, warmup=0) == [101.0, 103.0, 104.0]
    assert timing.steady_rates(rows, steps_per_epoch=5, window=2, warmup=4) == [103.0, 104.0]
    # Windows aligned with epochs: only each epoch's first window goes.
    assert len(timing.steady_rates(rows_for(40), steps_per_epoch=10, window=5, warmup=0)) == 4


@pytest.mark.parametrize("windows,warmup,window,per_epoch", [(3, 0, 2, 5), (6, 20, 10, 100), (2, 6, 3, 7)])
def test_steps_needed_is_the_fewest_steps_that_give_the_windows(windows, warmup, window, per_epoch):
    steps = timing.steps_needed(windows, warmup, window, per_epoch)
    assert steps % window == 0
    assert len(timing.steady_rates(rows_for(steps), per_epoch, window, warmup)) >= windows
    assert len(timing.steady_rates(rows_for(steps - window), per_epoch, window, warmup)) < windows


def test_a_window_longer_than_an_epoch_is_refused():
    with pytest.raises(SystemExit, match="--window 10 is longer than an epoch"):
        timing.steps_needed(3, 0, 10, 7)


def test_lever_names_are_checked_and_auto_means_none_without_a_gpu():
    assert throughput._levers("auto", gpu=False) == []
    assert throughput._levers("all", gpu=False) == list(throughput.LEVERS)
    assert throughput._levers("compile,log_every", gpu=True) == ["compile", "log_every"]
    with pytest.raises(SystemExit, match="--levers turbo"):
        throughput._levers("turbo", gpu=True)


def test_synthetic_batch_has_the_layout_and_type_asked_for():
    images, labels = children._synthetic_batch(4, 16, 10, torch.bfloat16, True, torch.device("cpu"))
    assert images.shape == (4, 3, 16, 16)
    assert images.dtype == torch.bfloat16
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64
    assert 0 <= labels.min()
    assert labels.max() < 10


@pytest.mark.gpu
def test_the_harness_on_a_gpu_measures_fp16_and_judges_the_targets(tmp_path):
    argv = ["--micro-batches", "32", "--arch", "resnet18", "--crop-size", "96", "--images", "2100", "--window", "2",
            "--windows", "2", "--levers", "log_every", "--results", str(tmp_path / "results"),
            "--work", str(tmp_path / "work")]  # fmt: skip
    assert throughput.main(argv) == 0
    (json_file,) = (tmp_path / "results").glob("*.json")
    result = json.loads(json_file.read_text())
    assert result["gpu"]
    assert result["precision"] == "fp16"
    assert not result["notes"]
    assert all(result[f"{mode}_img_s"] > 0 for mode in throughput.MODES)
    assert len(result["verdicts"]) == 3
    assert 0 < result["share_of_matrix_rate"] < 1
    assert [x["setting"] for x in result["levers"]] == list(throughput.LEVERS["log_every"][1])
