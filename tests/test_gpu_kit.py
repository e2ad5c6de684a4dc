"""What a lent GPU machine runs (bench/gpu/run.sh, bench/numerics.py), tried on this CPU first: the device time is
scarce, so a broken script must not be found there."""

from __future__ import annotations

import json
import shutil
import sys
import tarfile

import pytest

from bench import numerics
from tests import procs
from tests.helpers import ROOT, RUN_SH, run_sh


@pytest.mark.slow
def test_the_gpu_tests_import_without_wandb():
    """The GPU image has no wandb: the gpu-marked tests must collect without it."""
    code = ("import sys; sys.modules['wandb'] = None; import pytest; "
            "sys.exit(pytest.main(['--collect-only', '-q', '-m', 'gpu', '-p', 'no:cacheprovider']))")  # fmt: skip
    proc = procs.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "tests/test_train_gpu.py::" in proc.stdout and "error" not in proc.stdout.lower()


def test_run_sh_stops_at_once_without_the_carried_wheels_or_with_an_unknown_step(tmp_path):
    copy = tmp_path / "repo" / "bench" / "gpu" / "run.sh"
    copy.parent.mkdir(parents=True)
    shutil.copy(RUN_SH, copy)
    proc = run_sh(tmp_path, "tests", script=copy, site=tmp_path / "empty")
    assert proc.returncode == 2 and "error: .gpu/1 was not carried (bash bench/gpu/pack.sh here" in proc.stdout
    proc = run_sh(tmp_path, "benchmark")
    assert proc.returncode == 2 and "error: step benchmark: use tests, numerics or throughput" in proc.stdout


@pytest.mark.slow
def test_run_sh_tests_step_writes_the_summary_and_versions_into_the_returned_tar(tmp_path):
    proc = run_sh(tmp_path, "tests")
    assert proc.returncode == 0, proc.stdout[-3000:]
    with tarfile.open(tmp_path / "out" / "results.tar") as tar:
        (name,) = tar.getnames()
        text = tar.extractfile(name).read().decode()
    assert name.endswith("-tests.txt") and (tmp_path / "results" / name).exists()
    import deepspeed
    import nvidia.dali

    assert f"deepspeed {deepspeed.__version__} dali {nvidia.dali.__version__}" in text
    # No GPU here: every gpu test skips, and make test-gpu passes.
    assert " skipped, " in text and text.rstrip().endswith("make test-gpu: exit 0")
    assert " skipped, " in (tmp_path / "out" / "log.txt").read_text()


def test_loss_scale_moves_count_skips_and_growths():
    scales = [65536, 65536, 131072, 65536, 65536, 131072, 262144]
    skips = [0, 0, 0, 1, 1, 1, 1]
    rows = [{"loss_scale": float(s), "skipped_steps": k} for s, k in zip(scales, skips, strict=True)]
    moves = numerics.loss_scale_moves(rows)
    assert moves["growths"] == 3 and moves["skipped_steps"] == 1 and moves["max_scale"] == 262144
    assert moves["min_scale"] == 65536 and moves["skipped_share"] == pytest.approx(1 / 7)


def test_bn_distance_separates_drift_from_a_bias():
    import torch

    g = torch.Generator().manual_seed(0)
    kinds = ("running_mean", "running_var")
    ref = {f"l{i}.{kind}": torch.rand(64, generator=g) + 0.5 for i in range(3) for kind in kinds}
    # Channels shuffled within each layer: far apart channel by channel, the same size per layer.
    shuffled = {k: v[torch.randperm(64, generator=g)] for k, v in ref.items()}
    d = numerics.bn_distance(shuffled, ref)
    assert d["running_var_distance"] > 0.2 and d["running_var_scale"] < 1e-6
    # One layer's variances 20% low (lost updates): the scale check sees it.
    biased = {**ref, "l1.running_var": ref["l1.running_var"] * 0.8}
    assert numerics.bn_distance(biased, ref)["running_var_scale"] == pytest.approx(0.2)


@pytest.mark.slow
def test_numerics_compares_every_mode_with_fp32_and_records_a_failed_one(prepared, tmp_path):
    argv = ["--data-dir", str(prepared), "--modes", "fp32,bf16,fp16", "--arch", "shufflenet_v2_x0_5",
            "--crop-size", "32", "--val-resize", "40",
            "--epochs", "2", "--batch", "16", "--micro-batch", "8", "--top1-tolerance", "100", "--bn-tolerance", "10",
            "--results", str(tmp_path / "results"), "--work", str(tmp_path / "work")]  # fmt: skip
    # fp16 has no CPU path (DeepSpeed refuses it): that run fails, is recorded, and the exit status says so.
    assert numerics.main(argv) == 1
    (json_file,) = (tmp_path / "results").glob("*-numerics.json")
    result = json.loads(json_file.read_text())
    fp32, bf16, fp16 = result["runs"]
    assert fp32["mode"] == "fp32" and bf16["mode"] == "bf16" and fp16["failed"] == "exit 2"
    assert "fp16 needs a CUDA GPU" in fp16["log_tail"] or "CUDA is not usable" in fp16["log_tail"]
    assert fp32["bn_finite"] and bf16["bn_finite"] and fp32["bn_layers"] == bf16["bn_layers"] == 56
    assert bf16["top1_vs_fp32"] == pytest.approx(bf16["top1"] - fp32["top1"])
    assert fp32["steps"] == bf16["steps"] > 0 and bf16["loss_scale"] is None
    assert "--seed 0" in bf16["command"] and "ds.json" in bf16["command"]
    # Loose tolerances: bf16's checks pass; the failed run is a verdict of its own.
    verdicts = result["verdicts"]
    assert any(v.startswith("bf16: top-1 ") and v.endswith("within 100.0: yes)") for v in verdicts)
    assert any(v.startswith("fp16: the run failed (exit 2)") for v in verdicts)
    table = (tmp_path / "results" / json_file.name.replace(".json", ".md")).read_text()
    assert f"| bf16 | {bf16['top1']:.2f} | {bf16['top1_vs_fp32']:+.2f} |" in table
    # The checks themselves: a 16-bit run one point and a half below fp32 fails a 1-point tolerance.
    args = numerics.parse_args(["--data-dir", str(prepared)])
    worse = {**bf16, "top1_vs_fp32": -1.5}
    assert any(v.endswith("within 1.0: NO)") for v in numerics.verdicts([fp32, worse], args))
