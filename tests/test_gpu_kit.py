"""What a lent GPU machine runs (bench/gpu/session.sh, bench/numerics.py, bench/throughput.py), tried on this CPU
first: the device time is scarce, so a broken script must not be found there."""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
import sys
import tarfile
import time
from pathlib import Path
from xml.etree import ElementTree

import pytest

from bench import numerics
from tests import procs
from tests.runs import ROOT, SESSION, run_session


@pytest.mark.slow
def test_the_gpu_tests_import_without_wandb():
    """The GPU image has no wandb: the gpu-marked tests must collect without it."""
    code = ("import sys; sys.modules['wandb'] = None; import pytest; "
            "sys.exit(pytest.main(['--collect-only', '-q', '-m', 'gpu', '-p', 'no:cacheprovider']))")  # fmt: skip
    proc = procs.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "tests/test_train_gpu.py::" in proc.stdout
    assert "error" not in proc.stdout.lower()


def test_the_session_refuses_at_once_without_the_carried_wheels_or_with_a_bad_phase(tmp_path):
    copy = tmp_path / "repo" / "bench" / "gpu" / "session.sh"
    copy.parent.mkdir(parents=True)
    shutil.copy(SESSION, copy)
    proc = run_session(tmp_path, script=copy, site=tmp_path / "empty")
    assert proc.returncode == 2
    assert "error: .gpu/1 was not carried (bash bench/gpu/pack.sh here" in proc.stdout
    proc = run_session(tmp_path, "--skip", "bringup,benchmark")
    assert proc.returncode == 2
    assert "error: --skip benchmark: phases are bringup, dali, deepspeed, throughput, levers, extra" in proc.stdout
    proc = run_session(tmp_path, "--fast")
    assert proc.returncode == 2
    assert "usage: bash bench/gpu/session.sh [--skip PHASE,...]" in proc.stdout


@pytest.mark.slow
def test_a_phase_that_outlasts_its_box_is_stopped_and_the_session_goes_on(tmp_path):
    """A hang costs its box, not the call: the DALI tests hang (a python whose pytest sleeps), they are stopped when
    the budget of 20 s ends, the phases after them are skipped, and the session ends in time with what it has.
    (The budget leaves the session's start, an import of torch, time to spare on a slow machine.)"""
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\ncase "$*" in *"-m pytest"*) exec sleep 300;; esac\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    began = time.monotonic()
    proc = run_session(tmp_path, "--skip", "bringup", "--budget", "20", python=python)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert time.monotonic() - began < 50
    (session,) = (tmp_path / "results").glob("*-session.txt")
    lines = session.read_text().splitlines()[1:]
    assert re.fullmatch(r"dali dali-tests exit 124 in \d+s", lines[0]), lines
    assert re.search(r"\[dali-tests\] stopped at its box \(\d+s\)", proc.stdout)
    skipped = ["deepspeed deepspeed-tests", "deepspeed demo-data", "deepspeed numerics", "throughput demo-data",
               "throughput ", "levers -levers", "extra -mb16", "extra -memory-format", "extra -compile"]  # fmt: skip
    assert lines[1:] == [f"{step} skipped" for step in skipped]


@pytest.mark.slow
def test_the_session_runs_its_phases_and_returns_every_result(prepared, tmp_path):
    """bench/gpu/session.sh at a CPU's setting, every phase but the last two: the imports, the gpu tests (skipped
    without a GPU: collected, and passing), the numerics, and the throughput harness's four measurements with the
    step's phases and a profile, each result packed into $OUT/results.tar as it is written."""
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "shards").symlink_to(prepared)
    proc = run_session(tmp_path, "--skip", "levers,extra", demo=demo)
    assert proc.returncode == 0, proc.stdout[-3000:]
    results = tmp_path / "results"
    (session,) = results.glob("*-session.txt")
    lines = session.read_text().splitlines()[1:]
    steps = ["bringup imports", "dali dali-tests", "deepspeed deepspeed-tests", "deepspeed numerics", "throughput "]
    assert [line.split(" exit ")[0] for line in lines] == steps
    assert all(" exit 0 in " in line for line in lines), lines
    assert "== extra: skipped (--skip)" in proc.stdout
    # Bring-up: the versions, and every module of the project imported with DeepSpeed and DALI.
    import deepspeed
    import nvidia.dali

    (bringup,) = results.glob("*-bringup.txt")
    text = bringup.read_text()
    assert f"deepspeed {deepspeed.__version__} dali {nvidia.dali.__version__} gpu None" in text
    found = re.search(r"imported (\d+) of (\d+) modules", text)
    assert found
    assert found.group(1) == found.group(2)
    assert int(found.group(2)) > 40
    # The gpu tests: collected and run (skipped here, without a GPU).
    for name, count in (("dali", 5), ("deepspeed", 5)):
        (xml,) = results.glob(f"*-{name}-tests.xml")
        suite = ElementTree.parse(xml).getroot().find("testsuite")
        assert (int(suite.get("tests")), int(suite.get("skipped")), int(suite.get("failures"))) == (count, count, 0)
    assert_numerics_results(results, prepared)
    # Everything written came back in the tar.
    with tarfile.open(tmp_path / "out" / "results.tar") as tar:
        assert sorted(n.removeprefix("./") for n in tar.getnames()) == sorted(p.name for p in results.iterdir())
    assert_throughput_results(results, prepared)


def assert_throughput_results(results: Path, prepared: Path) -> None:
    """The harness's results at micro-batch 8 of a batch of 16, in cpu.json's precision for this processor."""
    from bench import children, throughput
    from pipeline import cpu

    (json_file,) = [p for p in results.glob("*-small.json")]
    result = json.loads(json_file.read_text())
    assert result["device"].startswith("CPU only")
    assert result["precision"] == cpu.default_precision()
    assert result["command"].startswith(f"python bench/throughput.py --results {results} --deepspeed-config ")
    assert [r["micro_batch"] for r in result["rows"]] == [8]
    assert result["repeats"] == 1
    (row,) = result["rows"]
    details = row["details"]
    for mode in throughput.MODES:
        # One run of 2 windows.
        rates, runs = details[mode]["windows"], details[mode]["per_run"]
        assert len(runs) == 1
        assert len(rates) == 2
        assert all(r > 0 for r in rates)
        assert row[f"{mode}_img_s"] == statistics.median(rates)
    # The same training images in every measurement: the batch of 16 by accumulation (2 micro-steps).
    assert details["end_to_end"]["steps"] == details["synthetic"]["steps"]
    assert row["deepspeed_config"]["train_micro_batch_size_per_gpu"] == 8
    assert row["deepspeed_config"]["train_batch_size"] == 16
    # The top operators of three profiled steps, beside the results.
    assert "Self CPU" in (results / row["profile_file"]).read_text()
    # Forward, backward and optimizer-step milliseconds per optimizer step, for both engines.
    assert set(row["phases_ms"]) == {"deepspeed", "amp"}
    assert all(set(p) == set(children.PHASES) and min(p.values()) > 0 for p in row["phases_ms"].values())
    assert result["micro_batch"] == 8
    assert result["end_to_end_img_s"] == row["end_to_end_img_s"]
    # ResNet-18 at 32 px: about 3 x 2 x 1.8 GMAC x (32/224)^2.
    assert result["train_flop"] == pytest.approx(3 * 2 * 1.82e9 * (32 / 224) ** 2, rel=0.1)
    table = (results / json_file.name.replace(".json", ".md")).read_text()
    assert f"| 8 | {row['dali_pipeline_img_s']:,.0f} |" in table
    backward = row["phases_ms"]["amp"]["backward"]
    assert f"| 8 | amp | {row['phases_ms']['amp']['forward']:.1f} | {backward:.1f} |" in table
    assert math.isfinite(row["deepspeed_vs_amp"])
    # Each measurement was logged as it ended: the same figures, in the order they were taken.
    logged = [json.loads(line) for line in (results / json_file.name.replace(".json", "-progress.jsonl")).open()]
    assert [(x["mode"], x["micro_batch"]) for x in logged[:4]] == [(m, 8) for m in throughput.MODES]
    assert [x["img_s"] for x in logged[:4]] == [details[m]["per_run"][0] for m in throughput.MODES]
    assert [x["mode"] for x in logged[4:]] == ["synthetic", "phases", "phases"]
    assert logged[-1]["settings"] == {"engine": "amp"}


def test_loss_scale_moves_count_skips_and_growths():
    scales = [65536, 65536, 131072, 65536, 65536, 131072, 262144]
    skips = [0, 0, 0, 1, 1, 1, 1]
    rows = [{"loss_scale": float(s), "skipped_steps": k} for s, k in zip(scales, skips, strict=True)]
    moves = numerics.loss_scale_moves(rows)
    assert moves["growths"] == 3
    assert moves["skipped_steps"] == 1
    assert moves["max_scale"] == 262144
    assert moves["min_scale"] == 65536
    assert moves["skipped_share"] == pytest.approx(1 / 7)


def test_bn_distance_separates_drift_from_a_bias():
    import torch

    g = torch.Generator().manual_seed(0)
    kinds = ("running_mean", "running_var")
    ref = {f"l{i}.{kind}": torch.rand(64, generator=g) + 0.5 for i in range(3) for kind in kinds}
    # Channels shuffled within each layer: far apart channel by channel, the same size per layer.
    shuffled = {k: v[torch.randperm(64, generator=g)] for k, v in ref.items()}
    d = numerics.bn_distance(shuffled, ref)
    assert d["running_var_distance"] > 0.2
    assert d["running_var_scale"] < 1e-06
    # One layer's variances 20% low (lost updates): the scale check sees it.
    biased = {**ref, "l1.running_var": ref["l1.running_var"] * 0.8}
    assert numerics.bn_distance(biased, ref)["running_var_scale"] == pytest.approx(0.2)


def assert_numerics_results(results: Path, prepared: Path) -> None:
    """bench/numerics.py's comparison at the session's CPU setting: fp32, then bf16 against it."""
    (json_file,) = results.glob("*-numerics.json")
    result = json.loads(json_file.read_text())
    fp32, bf16 = result["runs"]
    assert fp32["mode"] == "fp32"
    assert bf16["mode"] == "bf16"
    assert fp32["bn_finite"]
    assert bf16["bn_finite"]
    assert fp32["bn_layers"] == bf16["bn_layers"] == 56
    assert bf16["top1_vs_fp32"] == pytest.approx(bf16["top1"] - fp32["top1"])
    assert fp32["steps"] == bf16["steps"] > 0
    assert bf16["loss_scale"] is None
    assert "--seed 0" in bf16["command"]
    assert "ds.json" in bf16["command"]
    # Loose tolerances: bf16's checks pass.
    assert any(v.startswith("bf16: top-1 ") and v.endswith("within 100.0: yes)") for v in result["verdicts"])
    table = (results / json_file.name.replace(".json", ".md")).read_text()
    assert f"| bf16 | {bf16['top1']:.2f} | {bf16['top1_vs_fp32']:+.2f} |" in table
    # The checks themselves: a 16-bit run one point and a half below fp32 fails a 1-point tolerance.
    args = numerics.parse_args(["--data-dir", str(prepared)])
    worse = {**bf16, "top1_vs_fp32": -1.5}
    assert any(v.endswith("within 1.0: NO)") for v in numerics.verdicts([fp32, worse], args))


@pytest.mark.slow
def test_numerics_records_a_failed_run_and_exits_1(prepared, tmp_path):
    """A run that fails is recorded with its log's tail, and a mode without its fp32 reference is not run."""
    argv = ["--data-dir", str(prepared), "--arch", "no_such_net", "--modes", "fp32,bf16", "--results",
            str(tmp_path / "results"), "--work", str(tmp_path / "work")]  # fmt: skip
    assert numerics.main(argv) == 1
    (json_file,) = (tmp_path / "results").glob("*-numerics.json")
    fp32, bf16 = json.loads(json_file.read_text())["runs"]
    assert fp32["failed"] == "exit 2"
    assert "no_such_net" in fp32["log_tail"]
    assert bf16 == {"mode": "bf16", "failed": "no fp32 reference"}
    verdicts = json.loads(json_file.read_text())["verdicts"]
    assert any(v.startswith("fp32: the run failed (exit 2)") for v in verdicts)
