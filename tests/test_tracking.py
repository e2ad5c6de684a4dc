"""What a user watches: per-step input wait and step time, the input-bound line, and wandb as wandb users expect
(its environment variables, names and groups to compare runs by, flat config keys, the summary), read back from
real offline run files."""

import json
import os
import sys

import pytest

from pipeline.launch import without_launcher
from pipeline.tracking import Sink
from tests import procs
from tests.runs import ROOT, SMALL, ds_file, ok, train_cli
from tests.wandb_files import logged, run_file


def common(prepared, tmp_path, *more: str) -> list[str]:
    """A one-epoch fp32 run of the quirky dataset, stopped after 2 optimizer steps."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    return ["--deepspeed_config", ds_file(tmp_path, 32, 16, "fp32"), "--data-dir", str(prepared), *SMALL,
            "--epochs", "1", "--warmup-epochs", "0", "--max-steps", "2", "--out-dir", str(tmp_path / "run"),
            "--log-every", "1", *more]  # fmt: skip


@pytest.mark.slow
def test_a_slow_input_pipeline_is_named_at_the_epoch_end(prepared, tmp_path):
    # Also: WANDB_MODE=disabled (wandb's own variable, no flag) means no wandb at all.
    env = {**without_launcher(os.environ), "SLOW": "0.5", "WANDB_MODE": "disabled"}
    proc = procs.run([sys.executable, str(ROOT / "tests" / "train_slow_input.py"), *common(prepared, tmp_path)],
                     capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    stdout = ok(proc)
    assert not (tmp_path / "run" / "wandb").exists()
    assert "wandb files" not in stdout
    (line,) = [x for x in stdout.splitlines() if "input pipeline" in x]
    assert line.startswith("note: epoch 0: the input pipeline limits throughput: the training loop waited for batches")
    assert line.endswith("% of the epoch's time; raise --data-threads (now 1) or decode on a GPU")
    rows = [json.loads(x) for x in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    # Each optimizer step is 2 micro-batches, each waited for at least 0.5 s.
    assert all(r["data_wait_s"] >= 1.0 and r["step_s"] >= r["data_wait_s"] for r in rows)
    assert len(rows) == 2
    epoch = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0.05 < epoch["data_wait_share"] <= 1
    assert epoch["peak_gpu_memory_bytes"] is None


@pytest.mark.slow
def test_wandb_names_runs_to_compare_and_keeps_flat_keys_and_a_summary(prepared, tmp_path):
    stdout = ok(train_cli(*common(prepared, tmp_path, "--wandb-mode", "offline")))
    run = logged(tmp_path / "run")
    assert run["run"]["project"] == "imagenet-pipeline"
    assert run["run"]["job_type"] == "train"
    assert run["run"]["name"] == "resnet18 B=32 fp32 1xCPU"
    assert run["run"]["group"] == "resnet18 B=32"
    assert run["run"]["tags"] == ["resnet18", "B=32", "fp32", "1xCPU"]
    config = run["config"]
    assert {k: config[k] for k in ("arch", "global_batch", "micro_batch", "grad_accum", "world_size", "precision")} == {
        "arch": "resnet18", "global_batch": 32, "micro_batch": 16, "grad_accum": 2, "world_size": 1,
        "precision": "fp32"}  # fmt: skip
    assert config["peak_lr"] == config["schedule"]["params"]["warmup_max_lr"]  # flat keys beside the full sections
    steps = [h for h in run["history"] if "train/loss" in h]
    assert len(steps) == 2
    assert all(h["train/data_wait_s"] >= 0 and h["train/step_s"] > 0 for h in steps)
    summary = run["summary"]
    assert summary["best_top1"] is not None
    assert summary["images_per_sec"] > 0
    assert summary["train_wall_s"] > 0
    assert f"wandb files in {run_file(tmp_path / 'run').parent}" in stdout


@pytest.mark.slow
def test_wandb_environment_variables_work_and_a_flag_wins(prepared, tmp_path):
    # WANDB_PROJECT, WANDB_DIR, WANDB_NAME are wandb's to read; a flag wins over its variable (--wandb-mode over
    # WANDB_MODE=disabled, --wandb-group over WANDB_RUN_GROUP). WANDB_MODE=disabled alone:
    # test_a_slow_input_pipeline_is_named_at_the_epoch_end.
    env = {"WANDB_MODE": "disabled", "WANDB_PROJECT": "from-env", "WANDB_DIR": str(tmp_path / "wandb-dir"),
           "WANDB_NAME": "my name", "WANDB_RUN_GROUP": "env group"}  # fmt: skip
    flags = ("--wandb-mode", "offline", "--wandb-group", "flag group")
    stdout = ok(train_cli(*common(prepared, tmp_path, *flags), env=env))
    assert not (tmp_path / "run" / "wandb").exists()
    run = logged(tmp_path / "wandb-dir")
    assert run["run"]["project"] == "from-env"
    assert run["run"]["name"] == "my name"
    assert run["run"]["group"] == "flag group"
    assert f"wandb files in {tmp_path / 'wandb-dir' / 'wandb'}" in stdout


class MemorySink(Sink):
    """A sink that keeps everything it is told, in lists."""

    def __init__(self):
        self.rows: dict[str, list] = {"steps": [], "epochs": [], "summaries": [], "notes": []}
        self.closed = False

    def steps(self, rows: list[dict]) -> None:
        self.rows["steps"] += rows

    def epoch(self, row: dict, step: int) -> None:
        self.rows["epochs"].append((row, step))

    def summary(self, row: dict) -> None:
        self.rows["summaries"].append(row)

    def note(self, line: str) -> None:
        self.rows["notes"].append(line)

    def close(self) -> None:
        self.closed = True


def test_sinks_are_chosen_once_and_every_sink_gets_the_same_rows(tmp_path):
    from pipeline.tracking import METRICS, STEPS, JsonlSink, Sinks, open_sinks

    assert open_sinks(tmp_path, rank=1, wandb_args={"mode": "offline"}, config={}).sinks == []  # not rank 0: none
    chosen = open_sinks(tmp_path, rank=0, wandb_args=None, config={}, progress=False)
    assert [type(s).__name__ for s in chosen.sinks] == ["JsonlSink"]
    assert chosen.wandb_dir is None
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
    assert memory.rows["notes"] == ["done"]
    assert memory.closed


def test_a_wandb_key_that_ps_shows_is_noted(tmp_path):
    """exposed_key: the key on an ancestor's command line (as `mpirun -x WANDB_API_KEY=...` puts it), or in a
    .deepspeed_env; nothing where it is only in the environment (wandb login, NETRC)."""
    from pipeline.tracking import exposed_key

    key = "f" * 40
    code = "from pipeline.tracking import exposed_key; print(exposed_key(folders=()) or 'none')"
    # `; true` keeps the shell alive (a last command would replace it), with the key on its command line.
    shell = procs.run(["sh", "-c", f"WANDB_API_KEY={key} {sys.executable} -c \"{code}\"; true"], capture_output=True,
                      text=True, cwd=ROOT, env=without_launcher(os.environ), timeout=120)  # fmt: skip
    assert shell.stdout.startswith("WANDB_API_KEY is in the command line of sh (pid "), shell.stdout + shell.stderr
    (tmp_path / ".deepspeed_env").write_text(f"NCCL_DEBUG=INFO\nWANDB_API_KEY={key}\n")
    assert exposed_key({"WANDB_API_KEY": key}, folders=(tmp_path,)).startswith(
        f"WANDB_API_KEY is in {tmp_path / '.deepspeed_env'}, whose lines DeepSpeed's launchers put on every node's"
    )
    (tmp_path / ".deepspeed_env").write_text(f"NETRC={tmp_path / 'netrc'}\n")
    assert exposed_key({"WANDB_API_KEY": key}, folders=(tmp_path,)) is None
    assert exposed_key({}, folders=(tmp_path,)) is None
