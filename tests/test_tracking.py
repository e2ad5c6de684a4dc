"""What a user watches: per-step input wait and step time, the input-bound line, and wandb as wandb users expect
(its environment variables, names and groups to compare runs by, flat config keys, the summary), read back from
real offline run files."""

import json
import os
import sys

import pytest

from pipeline.distributed import without_launcher
from tests import procs
from tests.helpers import ROOT, SMALL, ds_file, logged, ok, run_file, train_cli


def common(prepared, tmp_path, *more: str) -> list[str]:
    """A one-epoch fp32 run of the quirky dataset, stopped after 2 optimizer steps."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    return ["--deepspeed_config", ds_file(tmp_path, 32, 16, "fp32"), "--data-dir", str(prepared), *SMALL,
            "--epochs", "1", "--warmup-epochs", "0", "--max-steps", "2", "--out-dir", str(tmp_path / "run"),
            "--log-every", "1", *more]  # fmt: skip


@pytest.mark.slow
def test_a_slow_input_pipeline_is_named_at_the_epoch_end(prepared, tmp_path):
    env = {**without_launcher(os.environ), "SLOW": "0.5"}
    proc = procs.run([sys.executable, str(ROOT / "tests" / "train_slow_input.py"),
                           *common(prepared, tmp_path, "--wandb-mode", "disabled")],
                          capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    stdout = ok(proc)
    (line,) = [x for x in stdout.splitlines() if "input pipeline" in x]
    assert line.startswith("note: epoch 0: the input pipeline limits throughput: the training loop waited for batches")
    assert line.endswith("% of the epoch's time; raise --data-threads (now 1) or decode on a GPU")
    rows = [json.loads(x) for x in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    # Each optimizer step is 2 micro-batches, each waited for at least 0.5 s.
    assert all(r["data_wait_s"] >= 1.0 and r["step_s"] >= r["data_wait_s"] for r in rows) and len(rows) == 2
    epoch = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0.05 < epoch["data_wait_share"] <= 1 and epoch["peak_gpu_memory_bytes"] is None


@pytest.mark.slow
def test_wandb_names_runs_to_compare_and_keeps_flat_keys_and_a_summary(prepared, tmp_path):
    stdout = ok(train_cli(*common(prepared, tmp_path, "--wandb-mode", "offline")))
    run = logged(tmp_path / "run")
    assert run["run"]["project"] == "imagenet-pipeline" and run["run"]["job_type"] == "train"
    assert run["run"]["name"] == "resnet18 B=32 fp32 1xCPU" and run["run"]["group"] == "resnet18 B=32"
    assert run["run"]["tags"] == ["resnet18", "B=32", "fp32", "1xCPU"]
    config = run["config"]
    assert {k: config[k] for k in ("arch", "global_batch", "micro_batch", "grad_accum", "world_size", "precision")} == {
        "arch": "resnet18", "global_batch": 32, "micro_batch": 16, "grad_accum": 2, "world_size": 1,
        "precision": "fp32"}  # fmt: skip
    assert config["peak_lr"] == config["schedule"]["peak_lr"]  # the flat keys beside the full sections
    steps = [h for h in run["history"] if "train/loss" in h]
    assert len(steps) == 2 and all(h["train/data_wait_s"] >= 0 and h["train/step_s"] > 0 for h in steps)
    summary = run["summary"]
    assert summary["best_top1"] is not None and summary["images_per_sec"] > 0 and summary["train_wall_s"] > 0
    assert f"wandb files in {run_file(tmp_path / 'run').parent}" in stdout


@pytest.mark.slow
def test_wandb_environment_variables_work_and_a_flag_wins(prepared, tmp_path):
    # WANDB_MODE=disabled: no wandb at all (this used to write an offline run).
    stdout = ok(train_cli(*common(prepared, tmp_path / "a"), env={"WANDB_MODE": "disabled"}))
    assert not (tmp_path / "a" / "run" / "wandb").exists() and "wandb files" not in stdout
    # WANDB_PROJECT, WANDB_DIR, WANDB_NAME, WANDB_RUN_GROUP are wandb's to read.
    env = {"WANDB_MODE": "offline", "WANDB_PROJECT": "from-env", "WANDB_DIR": str(tmp_path / "wandb-dir"),
           "WANDB_NAME": "my name", "WANDB_RUN_GROUP": "my group"}  # fmt: skip
    stdout = ok(train_cli(*common(prepared, tmp_path / "b"), env=env))
    assert not (tmp_path / "b" / "run" / "wandb").exists()
    run = logged(tmp_path / "wandb-dir")
    assert (run["run"]["project"], run["run"]["name"], run["run"]["group"]) == ("from-env", "my name", "my group")
    assert f"wandb files in {tmp_path / 'wandb-dir' / 'wandb'}" in stdout
    # A flag wins over the variable.
    ok(train_cli(*common(prepared, tmp_path / "c", "--wandb-project", "from-flag", "--wandb-mode", "offline"),
                 env={"WANDB_PROJECT": "from-env", "WANDB_MODE": "disabled"}))  # fmt: skip
    assert logged(tmp_path / "c" / "run")["run"]["project"] == "from-flag"


def test_sinks_are_chosen_once_and_every_sink_gets_the_same_rows(tmp_path):
    from pipeline.tracking import METRICS, STEPS, JsonlSink, MemorySink, Sinks, open_sinks

    assert open_sinks(tmp_path, rank=1, wandb_args={"mode": "offline"}, config={}).sinks == []  # not rank 0: none
    chosen = open_sinks(tmp_path, rank=0, wandb_args=None, config={}, progress=False)
    assert [type(s).__name__ for s in chosen.sinks] == ["JsonlSink"] and chosen.wandb_dir is None
    memory = MemorySink()
    sinks = Sinks([JsonlSink(tmp_path), memory])
    rows = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.25}]
    sinks.progress(10, 0)
    sinks.steps(rows)
    sinks.epoch({"epoch": 0, "val_top1": 12.5}, 2)
    sinks.summary({"summary": True, "steps": 2})
    sinks.note("done")
    sinks.close()
    assert [json.loads(x) for x in (tmp_path / STEPS).read_text().splitlines()] == memory.rows["steps"] == rows
    metrics = [json.loads(x) for x in (tmp_path / METRICS).read_text().splitlines()]
    assert metrics == [memory.rows["epochs"][0][0], *memory.rows["summaries"]]
    assert memory.rows["notes"] == ["done"] and memory.closed
