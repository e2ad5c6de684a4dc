"""The scaling study: each variant's lr and warmup follow the rule, and a tiny study gives a well-formed result."""

import json

import pytest
import yaml
from PIL import Image

from pipeline import scaling_study
from pipeline.scaling import Recipe
from pipeline.scaling_study import VARIANTS, study_runs
from tests.runs import run_module
from tests.wandb_files import logged


def test_each_variant_gets_the_lr_and_warmup_the_rule_gives():
    runs = {r.name: r for r in study_runs(32, [32, 256, 1024], list(VARIANTS), lr0=0.0125, warmup=2, lars=True)}
    assert list(runs) == [
        "b32-baseline", "b256-rule+warmup", "b256-rule", "b256-no-rule",
        "b1024-rule+warmup", "b1024-rule", "b1024-no-rule", "b1024-rule+warmup-lars",
    ]  # fmt: skip
    expected = {  # name: (peak lr, warmup epochs)
        "b32-baseline": (0.0125, 0), "b256-rule+warmup": (0.1, 2), "b256-rule": (0.1, 0), "b256-no-rule": (0.0125, 0),
        "b1024-rule+warmup": (0.4, 2), "b1024-rule": (0.4, 0), "b1024-no-rule": (0.0125, 0),
        "b1024-rule+warmup-lars": (0.4, 2),
    }  # fmt: skip
    for name, (lr, warmup) in expected.items():
        run = runs[name]
        assert (run.lr, run.warmup_epochs) == pytest.approx((lr, warmup)), name
        # What train.py derives from the reference it is given: the same peak, warmup starting at lr0.
        recipe = Recipe(run.batch_size, 32, epochs=10, warmup_epochs=run.warmup_epochs,
                        reference_batch=run.reference_batch, reference_lr=0.0125)  # fmt: skip
        assert (recipe.peak_lr, recipe.base_lr) == pytest.approx((lr, 0.0125)), name
    assert runs["b1024-rule+warmup-lars"].optimizer == "lars"
    assert runs["b256-rule"].optimizer == "sgd"


@pytest.mark.slow
def test_a_tiny_study_end_to_end(prepared, tmp_path):
    """Every run of the study on 2 ranks (--nproc 2: train.py through torchrun, each rank half of the batch)."""
    out = tmp_path / "study"
    proc = run_module(
        "pipeline.scaling_study", "--data-dir", str(prepared), "--base-batch", "32", "--batch-sizes", "32,64",
        "--epochs", "2", "--warmup-epochs", "1", "--out", str(out), "--arch", "resnet18", "--crop-size", "32",
        "--val-resize", "36", "--lars", "--wandb-mode", "offline", "--variants", "rule+warmup",
        "--nproc", "2", "--micro-batch", "16",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    runs = summary["runs"]
    # Every variant's lr and warmup: test_each_variant_gets_the_lr_and_warmup_the_rule_gives; here one, with LARS.
    assert [r["name"] for r in runs] == ["b32-baseline", "b64-rule+warmup", "b64-rule+warmup-lars"]
    images = json.loads((prepared / "manifest.json").read_text())["splits"]["train"]["images"]
    for r in runs:
        assert 0 <= r["final_val_top1"] <= 100
        xs = [x for x, _ in r["train_error_curve"]]
        assert xs == sorted(xs)
        assert xs[-1] == 2
        assert all(x * 4 == int(x * 4) for x in xs)
        assert all(0 <= y <= 100 for _, y in r["train_error_curve"])
        # train.py ran with the lr and warmup of the plan: its derived schedule says so.
        saved = yaml.safe_load((out / "runs" / r["name"] / "config.yaml").read_text())
        assert saved["derived"]["world_size"] == 2
        assert saved["deepspeed"]["train_batch_size"] == r["batch_size"]
        per_epoch = -(-images // r["batch_size"])
        params = saved["schedule"]["params"]
        assert params["peak_lr"] == pytest.approx(r["lr"])
        assert params["base_lr"] == pytest.approx(summary["base_lr"])
        assert params["warmup_steps"] == round(r["warmup_epochs"] * per_epoch)
        assert saved["run"]["model"]["optimizer"] == r["optimizer"]
        assert saved["run"]["tracking"]["wandb_group"] == "scaling-study-study"
        # In wandb each run is named after its variant, in the study's group.
        assert logged(out / "runs" / r["name"])["run"] | {"tags": None, "id": None} == {
            "project": "imagenet-pipeline", "name": r["name"], "group": "scaling-study-study", "job_type": "train",
            "tags": None, "id": None}  # fmt: skip
    assert runs[0]["gap_to_baseline"] == {"final_top1": 0, "mean_abs_curve_gap_after_warmup": 0}
    assert runs[1]["gap_to_baseline"]["final_top1"] == pytest.approx(
        runs[1]["final_val_top1"] - runs[0]["final_val_top1"]
    )
    table = (out / "summary.md").read_text()
    assert table.count("\n") == 2 + len(runs)
    assert "| 64 | rule+warmup | lars | 0.025 | 1 |" in table
    with Image.open(out / "curves.png") as png:
        assert png.size[0] > 400
        assert png.size[1] > 300
    study = logged(out)
    logged_row = study["history"][0]
    assert logged_row["curves/_type"] == "image-file"
    assert logged_row["summary/_type"] == "table-file"
    assert logged_row["summary/nrows"] == len(runs)
    assert study["config"]["base_batch"] == 32


def test_bad_study_input_is_one_line(capsys):
    base = ["--data-dir", "d", "--epochs", "4", "--out", "o", "--base-batch", "32"]
    assert scaling_study.main([*base, "--batch-sizes", "32,48"]) == 2
    assert "batch size 48 is not a positive multiple of --micro-batch 32" in capsys.readouterr().err
    assert scaling_study.main([*base, "--batch-sizes", "64,128"]) == 2
    assert "include --base-batch 32 and a larger one" in capsys.readouterr().err
    assert scaling_study.main([*base, "--batch-sizes", "32,64", "--variants", "rule,lars"]) == 2
    assert "--variants rule,lars: choose from" in capsys.readouterr().err


def test_a_micro_batch_the_ranks_cannot_share_is_refused_before_any_run(capsys, tmp_path):
    argv = ["--data-dir", "x", "--base-batch", "32", "--batch-sizes", "32,64", "--out", str(tmp_path / "no"),
            "--epochs", "2", "--nproc", "2"]  # fmt: skip
    assert scaling_study.main(argv) == 2
    assert "batch size 32 is not a positive multiple of --micro-batch 32 x --nproc 2" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
