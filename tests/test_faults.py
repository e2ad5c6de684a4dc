"""Faults a long run must survive or stop on cleanly: NaN and overflow, a dead rank, kill -9 during a checkpoint."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from pipeline import checkpoint, deepspeed_json, engine, loss_scale
from pipeline.faults import Guard, NumericFault
from pipeline.launch import free_port, without_launcher
from tests import procs
from tests.models import constant_schedule
from tests.pictures import jpeg
from tests.runs import ROOT, SMALL, SMALL_16BIT, ds_file, ok, train_cli
from tests.shardsets import write_shards

FAULTY = str(ROOT / "tests" / "train_faulty.py")


def faulty(fault: str, *args: str) -> subprocess.CompletedProcess:
    """pipeline/train.py with FAULT injected into its images (tests/train_faulty.py), one process."""
    return procs.run([sys.executable, FAULTY, *args], capture_output=True, text=True, timeout=600,
                          env={**without_launcher(os.environ), "FAULT": fault})  # fmt: skip


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error:` line a failed run printed."""
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    return line


@pytest.mark.slow
def test_nan_loss_in_fp32_stops_at_its_step_and_no_checkpoint_holds_it(prepared, tmp_path):
    out = tmp_path / "run"
    proc = faulty("nan@3", "--deepspeed_config", ds_file(tmp_path, 32, 16, "fp32"), "--data-dir", str(prepared), *SMALL,
                  "--epochs", "2", "--warmup-epochs", "1", "--out-dir", str(out), "--wandb-mode", "disabled",
                  "--save-every-steps", "2", "--log-every", "5")  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert error_line(proc).startswith("error: step 3: the training loss is nan in fp32; last finite loss ")
    assert "at step 2;" in error_line(proc)
    # The save at step 4 never happened: the fault was found first. Step 2's checkpoint is the newest.
    assert [p.name for p in checkpoint.complete(out / "checkpoints")] == [checkpoint.tag(2)]
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["fault"].startswith("step 3:")


@pytest.mark.slow
def test_nan_loss_in_bf16_stops_at_its_step(prepared, tmp_path):
    proc = faulty("inf@2+", "--deepspeed_config", ds_file(tmp_path, 32, 16, "bf16"), "--data-dir", str(prepared),
                  *SMALL_16BIT, "--epochs", "2", "--warmup-epochs", "1", "--out-dir", str(tmp_path / "run"),
                  "--wandb-mode", "disabled", "--log-every", "100")  # fmt: skip
    assert proc.returncode == 3
    assert error_line(proc).startswith("error: step 2: the training loss is nan in bf16; last finite loss")


def test_overflow_skips_in_a_row_stop_a_real_engine(process_group):
    """DeepSpeed skips bf16 steps with non-finite gradients; the guard counts them and stops at the limit."""
    s = constant_schedule(0.1, total_steps=20, steps_per_epoch=5)
    ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
          "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}  # fmt: skip
    eng = engine.build(torch.nn.Linear(4, 3), deepspeed_json.with_schedule(ds, s), s)
    guard, x = Guard("bf16", max_skipped_steps=3, min_loss_scale=1.0), torch.randn(2, 4, dtype=torch.bfloat16)
    scale = loss_scale.LossScale(eng)
    with pytest.raises(NumericFault, match=r"step 6: 3 optimizer steps in a row skipped for overflow \(loss scale 1\)"):
        for step in range(1, 9):
            eng.backward(eng(x).float().sum() * (float("inf") if step in (2, 4, 5, 6, 7) else 1.0))
            eng.step()
            now, skipped = scale.now()
            guard.check([{"step": eng.global_steps, "loss": 1.0, "loss_scale": now, "skipped_steps": skipped}])
    # Skips at steps 2, 4, 5 and 6: the finite step 3 resets the count, which reaches 3 at step 6.
    assert (step, eng.global_steps, eng.skipped_steps) == (6, 6, 4)


def rows(*steps: tuple[float, int, float]) -> list[dict]:
    """Flushed rows from (loss, skipped steps so far, loss scale), numbered from step 1."""
    return [dict(step=i, loss=loss, skipped_steps=skipped, loss_scale=scale)
            for i, (loss, skipped, scale) in enumerate(steps, 1)]  # fmt: skip


@pytest.mark.parametrize("precision", ["fp16", "autocast-fp16"])
def test_fp16_overflow_at_the_minimum_loss_scale_stops(precision):
    guard = Guard(precision, max_skipped_steps=0, min_loss_scale=1.0)
    # An ordinary skip halves the scale; a NaN loss in fp16 is a skipped step, not a fault.
    guard.check(rows((2.5, 0, 65536.0), (float("nan"), 1, 32768.0)))
    with pytest.raises(
        NumericFault, match="step 3: fp16 overflow with the loss scale at its minimum 1; last finite loss 2.5 at step 1"
    ):
        guard.check(rows((2.5, 1, 65536.0), (2.5, 1, 2.0), (float("nan"), 2, 1.0))[2:])


@pytest.mark.parametrize("precision", ["bf16", "fp32", "autocast-bf16"])
def test_a_non_finite_loss_without_loss_scaling_stops(precision):
    guard = Guard(precision, max_skipped_steps=25, min_loss_scale=1.0)
    with pytest.raises(NumericFault, match=f"step 2: the training loss is inf in {precision}; last finite loss 3 at"):
        guard.check(rows((3.0, 0, 1.0), (float("inf"), 0, 1.0)))


@pytest.mark.slow
def test_a_record_that_does_not_decode_stops_training_naming_it(tmp_path):
    good = jpeg(np.full((40, 40, 3), 90, np.uint8))
    write_shards(tmp_path / "data", "train", [(good, 1)] * 12 + [(good[:300], 1)] + [(good, 1)] * 3, 2)
    write_shards(tmp_path / "data", "validation", [(good, 1)] * 4, 1)
    proc = train_cli("--deepspeed_config", ds_file(tmp_path, 32, 16, "fp32"), "--data-dir", str(tmp_path / "data"),
                     "--num-classes", "2", *SMALL, "--epochs", "3", "--warmup-epochs", "1",
                     "--out-dir", str(tmp_path / "run"), "--wandb-mode", "disabled")  # fmt: skip
    assert proc.returncode == 2
    assert re.match(rf"error: {tmp_path}/data/train-0000\d-of-00002: record at offset \d+: image does not decode",
                    error_line(proc))  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_a_dead_or_silent_rank_ends_the_others(prepared, tmp_path, fault):
    """Two ranks started by hand (as on two hosts, no launcher to clean up); mid-training rank 1 is killed (its
    sockets close: rank 0 fails at once) or stopped (its sockets stay open and silent: rank 0's collective waits
    --dist-timeout). Either way rank 0 ends with one line naming rank 1, and never hangs."""
    port, ds = str(free_port()), ds_file(tmp_path, 32, 16, "fp32")
    ranks, timeout = [], 6
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}  # fmt: skip
        args = ["--deepspeed_config", ds, "--data-dir", str(prepared), *SMALL, "--epochs", "50", "--warmup-epochs",
                "1", "--out-dir", str(tmp_path / "run"), "--wandb-mode", "disabled", "--log-every", "1",
                "--dist-timeout", str(timeout)]  # fmt: skip
        ranks.append(procs.start([sys.executable, str(ROOT / "pipeline" / "train.py"), *args], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))  # fmt: skip
    steps = tmp_path / "run" / "steps.jsonl"
    deadline = time.monotonic() + 300
    while not (steps.exists() and steps.read_text().count("\n") >= 3):
        assert time.monotonic() < deadline, "training did not start"
        assert ranks[0].poll() is None, "training did not start"
        time.sleep(0.2)
    ranks[1].send_signal(fault)
    faulted = time.monotonic()
    try:
        ranks[0].wait(timeout=120)
        ended = time.monotonic() - faulted
    finally:
        ranks[1].kill()
    assert ranks[0].returncode == 4
    # A closed socket fails the collective at once; an open, silent one when --dist-timeout expires.
    assert ended < timeout if fault == signal.SIGKILL else timeout <= ended < timeout + 20, ended
    # One line saying what happened, not gloo's traceback.
    (line,) = [x for x in ranks[0].stderr.read().splitlines() if x.startswith("error: ")]
    assert re.match(r"error: rank 0 of 2 on 127\.0\.0\.1 \(.+\): a collective failed at step \d+: lost rank 1 on "
                    r"127\.0\.0\.1 \(.+\); the job is over", line), line  # fmt: skip


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_then_resume(prepared, tmp_path):
    """kill -9 while a checkpoint folder exists without complete.json; --resume auto takes the one before. The run
    has one more component that neither train.py nor checkpoint.py knows (tests/train_extra_state.py): the resumed
    session gets back the state the killed one saved with that checkpoint."""
    out, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args = ["--deepspeed_config", ds_file(tmp_path, 32, 16, "fp32"), "--data-dir", str(prepared), *SMALL,
            "--epochs", "2", "--warmup-epochs", "1", "--out-dir", str(out), "--wandb-mode", "disabled",
            "--save-every-steps", "1"]  # fmt: skip
    command = [sys.executable, str(ROOT / "tests" / "train_extra_state.py"), *args]
    env = {**without_launcher(os.environ), "EXTRA_STATE_OUT": str(tmp_path / "extra.json")}
    proc = procs.start(command, env={**env, "SESSION": "killed"}, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)  # fmt: skip
    deadline, caught = time.monotonic() + 300, None
    while caught is None:
        assert time.monotonic() < deadline, "no checkpoint write was caught in progress"
        assert proc.poll() is None, "no checkpoint write was caught in progress"
        done = checkpoint.complete(ckpts)
        # A folder newer than every complete one and without complete.json is being written (older ones
        # without it are being pruned).
        writing = [p for p in ckpts.glob("step*") if done and p.name > done[-1].name]
        caught = next((p for p in writing if not (p / checkpoint.COMPLETE).exists()), None)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    newest = checkpoint.complete(ckpts)[-1]
    assert newest.name < caught.name
    assert not (caught / checkpoint.COMPLETE).exists()
    step = json.loads((newest / checkpoint.COMPLETE).read_text())["step"]
    resumed = procs.run([*command, "--resume", "auto", "--max-steps", str(step + 2)], capture_output=True, text=True,
                        env={**env, "SESSION": "resumed"})  # fmt: skip
    stdout = ok(resumed)
    assert f"resumed from {newest} at step {step}" in stdout
    assert json.loads((tmp_path / "extra.json").read_text()) == {"session": "killed", "step": step}
    (done,) = [x for x in stdout.splitlines() if x.startswith("done: ")]
    assert f" after {step + 2} steps; " in done
    # The torn folder was rewritten by the resumed run or deleted once a later checkpoint was complete.
    assert all((p / checkpoint.COMPLETE).exists() for p in ckpts.glob("step*"))


@pytest.mark.slow
def test_autocast_fp16_skips_an_overflow_and_a_resume_keeps_its_loss_scale(prepared, tmp_path):
    """DeepSpeed's torch_autocast fp16 through train.py (on the CPU with --allow-cpu): an overflow at step 2 is a
    skipped step that halves GradScaler's scale; a resumed run goes on with that scale and skip count, which
    DeepSpeed's own checkpoint does not keep."""
    out = tmp_path / "run"
    ds = ds_file(tmp_path, 32, 16, "autocast-fp16")
    common = ["--deepspeed_config", ds, "--data-dir", str(prepared), *SMALL_16BIT, "--epochs", "2", "--warmup-epochs",
              "1", "--out-dir", str(out), "--wandb-mode", "disabled", "--allow-cpu", "--log-every", "1"]  # fmt: skip
    proc = faulty("inf@2", *common, "--max-steps", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--allow-cpu: autocast-fp16 on this CPU host" in proc.stdout
    rows = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    # The injected inf: a skipped step that halves the scale (this small model may overflow on its own too).
    assert not np.isfinite(rows[1]["loss"])
    assert np.isfinite(rows[2]["loss"])
    assert rows[1]["skipped_steps"] == rows[0]["skipped_steps"] + 1
    ok(train_cli(*common, "--max-steps", "5", "--resume", "auto"))
    rows = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    # Through the resume at step 3 too: the scale halves exactly at each skip and is otherwise kept (no growth in
    # 5 steps: the window is 2000). A resume that lost the scale or the count would break this.
    start = {"loss_scale": 65536.0, "skipped_steps": 0}
    for before, after in zip([start, *rows], rows, strict=False):
        skipped = after["skipped_steps"] - before["skipped_steps"]
        assert skipped in (0, 1), after
        assert after["loss_scale"] == before["loss_scale"] / 2**skipped, after
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "summary" not in line]
    assert epochs[-1]["skipped_steps"] == rows[-1]["skipped_steps"]


def test_a_lost_peer_is_told_apart_from_other_errors():
    from pipeline.distributed import lost_peer

    gloo = "[/src/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [10.0.0.12]:57509: Connection reset by peer. This is typically caused by a remote worker hanging"  # noqa: E501
    assert lost_peer(RuntimeError(gloo)) == ("10.0.0.12", "Read error: Connection reset by peer")
    closed = "[/src/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [10.0.0.11]:4242"
    assert lost_peer(RuntimeError(closed)) == ("10.0.0.11", "Connection closed by peer")
    assert lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
