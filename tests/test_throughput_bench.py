"""bench/throughput.py: how steps become timed windows, and a whole harness run on the CPU (every measurement in
its own process: DALI alone, synthetic input through train.py's loop, train.py end to end, plain PyTorch AMP)."""

import json
import math
import statistics
import tarfile

import pytest
import torch

from bench import children, throughput
from bench import windows as timing
from pipeline import cpu, scaling
from tests.helpers import run_sh


def rows_for(steps: int, rate=lambda s: float(s)) -> list[dict]:
    """Per-step rows like steps.jsonl, each step's rate given by `rate`."""
    return [{"step": s, "images_per_sec": rate(s)} for s in range(1, steps + 1)]


def test_windows_are_closed_like_train_py_every_window_steps_and_at_epoch_ends():
    clock = timing.Windows(window=2, images_per_step=10, steps_per_epoch=5, gpu=False)
    for step in range(1, 11):
        clock.step(step)
    by_rate: dict[float, list[int]] = {}
    for row in clock.rows:
        by_rate.setdefault(row["images_per_sec"], []).append(row["step"])
    # Flush points at multiples of 2 and at the epoch end, step 5: {1,2} {3,4} {5} {6} {7,8} {9,10}.
    assert sorted(by_rate.values()) == [[1, 2], [3, 4], [5], [6], [7, 8], [9, 10]]
    assert all(rate > 0 for rate in by_rate)


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
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.bfloat16
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 10


@pytest.mark.slow
def test_the_harness_measures_all_four_and_writes_its_results(prepared, tmp_path):
    ds = tmp_path / "b16.json"
    ds.write_text(scaling.render(scaling.ds_config(scaling.Recipe(16, 8, "auto", fused=False))))
    argv = ["--data-dir", str(prepared), "--micro-batches", "8", "--arch", "resnet18", "--crop-size", "32",
            "--window", "2", "--windows", "2", "--data-threads", "1", "--repeats", "2", "--levers", "none", "--profile",
            "--work", str(tmp_path / "work")]  # fmt: skip
    # As a lent GPU machine runs it: bench/gpu/run.sh's throughput step (its results tagged with the configuration
    # and packed into $OUT/results.tar as they are written).
    proc = run_sh(tmp_path, "throughput", "--deepspeed-config", str(ds), *argv)
    assert proc.returncode == 0, proc.stdout[-3000:]
    (json_file,) = (tmp_path / "results").glob("*.json")
    results = json_file.parent
    assert json_file.name.endswith("-b16.json")
    with tarfile.open(tmp_path / "out" / "results.tar") as tar:
        assert sorted(n.removeprefix("./") for n in tar.getnames()) == sorted(p.name for p in results.iterdir())
    result = json.loads(json_file.read_text())
    # The bench's CPU setting follows the processor, as cpu.json does: bf16 where it is native, else fp32.
    assert result["device"].startswith("CPU only") and result["precision"] == cpu.default_precision()
    assert result["command"] == " ".join(["python bench/throughput.py --results", str(results), "--deepspeed-config",
                                          str(ds), "--tag b16", *argv])  # fmt: skip
    assert [r["micro_batch"] for r in result["rows"]] == [8]
    for row in result["rows"]:
        details = row["details"]
        for mode in throughput.MODES:
            # Two runs of 2 windows each, pooled.
            rates, runs = details[mode]["windows"], details[mode]["per_run"]
            assert len(runs) == 2 and len(rates) == 4 and all(r > 0 for r in rates)
            assert row[f"{mode}_img_s"] == statistics.median(rates)
            assert sorted(runs) == sorted([statistics.median(rates[:2]), statistics.median(rates[2:])])
        # The same training images in every measurement: the batch of 16 by accumulation (2 micro-steps).
        assert details["end_to_end"]["steps"] == details["synthetic"]["steps"]
        assert row["deepspeed_config"]["train_micro_batch_size_per_gpu"] == row["micro_batch"]
        assert row["deepspeed_config"]["train_batch_size"] == 16
        assert f"--deepspeed_config {tmp_path / 'work'}" in details["end_to_end"]["command"]
        # The top operators of three profiled steps, beside the results.
        assert "Self CPU" in (results / row["profile_file"]).read_text()
    # The repeats take turns: every mode once, then every mode again; then the profiled run and the phases.
    runs = sorted((tmp_path / "work").glob("run*-mb8"), key=lambda p: int(p.name[3:].split("-")[0]))
    assert [p.name.split("-", 1)[1].removesuffix("-mb8") for p in runs] == [*throughput.MODES * 2, "synthetic",
                                                                            "phases", "phases"]  # fmt: skip
    for row in result["rows"]:
        # Forward, backward and optimizer-step milliseconds per optimizer step, for both engines.
        assert set(row["phases_ms"]) == {"deepspeed", "amp"}
        assert all(set(p) == set(children.PHASES) and min(p.values()) > 0 for p in row["phases_ms"].values())
    best = max(result["rows"], key=lambda r: r["end_to_end_img_s"])
    assert result["micro_batch"] == best["micro_batch"] and result["end_to_end_img_s"] == best["end_to_end_img_s"]
    # ResNet-18 at 32 px: about 3 x 2 x 1.8 GMAC x (32/224)^2.
    assert result["train_flop"] == pytest.approx(3 * 2 * 1.82e9 * (32 / 224) ** 2, rel=0.1)
    table = (results / json_file.name.replace(".json", ".md")).read_text()
    assert f"| 8 | {result['rows'][0]['dali_pipeline_img_s']:,.0f} |" in table
    backward = result["rows"][0]["phases_ms"]["amp"]["backward"]
    assert f"| 8 | amp | {result['rows'][0]['phases_ms']['amp']['forward']:.1f} | {backward:.1f} |" in table
    assert math.isfinite(result["rows"][0]["deepspeed_vs_amp"])
    # Each measurement was logged as it ended: the same figures, in the order they were taken.
    logged = [json.loads(line) for line in (results / json_file.name.replace(".json", "-progress.jsonl")).open()]
    assert len(logged) == len(list((tmp_path / "work").glob("run*")))
    first = result["rows"][0]["details"]
    assert [(x["mode"], x["micro_batch"]) for x in logged[:4]] == [(m, 8) for m in throughput.MODES]
    assert [x["img_s"] for x in logged[:4]] == [first[m]["per_run"][0] for m in throughput.MODES]
    assert logged[-1]["mode"] == "phases" and logged[-1]["settings"] == {"engine": "amp"}


@pytest.mark.gpu
def test_the_harness_on_a_gpu_measures_fp16_and_judges_the_targets(tmp_path):
    argv = ["--micro-batches", "32", "--arch", "resnet18", "--crop-size", "96", "--images", "2100", "--window", "2",
            "--windows", "2", "--levers", "log_every", "--results", str(tmp_path / "results"),
            "--work", str(tmp_path / "work")]  # fmt: skip
    assert throughput.main(argv) == 0
    (json_file,) = (tmp_path / "results").glob("*.json")
    result = json.loads(json_file.read_text())
    assert result["gpu"] and result["precision"] == "fp16" and not result["notes"]
    assert all(result[f"{mode}_img_s"] > 0 for mode in throughput.MODES)
    assert len(result["verdicts"]) == 3 and 0 < result["share_of_matrix_rate"] < 1
    assert [x["setting"] for x in result["levers"]] == list(throughput.LEVERS["log_every"][1])
