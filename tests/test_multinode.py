"""Multi-node as users launch it: `deepspeed --hostfile hosts pipeline/train.py ...` across two test hosts (network
namespaces with their own sshd, reached through pdsh), 2 ranks each, gloo on the CPU."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import checkpoint
from pipeline.distributed import free_port
from pipeline.shards import shard_bounds
from tests import procs
from tests.helpers import ROOT, SMALL, ds_file, labelled_set, metrics, run_file
from tests.hosts import Hosts, command_line

pytestmark = pytest.mark.slow
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Two test hosts for this module's tests."""
    made = Hosts(tmp_path_factory.mktemp("hosts"))
    yield made
    made.close()


def test_two_hosts_train_as_one_job(hosts, tmp_path):
    data, out, report = labelled_set(tmp_path / "data", train=45, val=21), tmp_path / "run", tmp_path / "ranks.json"
    env = hosts.env({"RANKS_REPORT": str(report), "PIPELINE_PROBE": "set on the launching host",
                     "OMP_NUM_THREADS": "1"})  # fmt: skip
    proc = procs.run(
        [DEEPSPEED, "--hostfile", str(hosts.hostfile(2)), "--master_port", str(free_port()),
         str(ROOT / "tests" / "train_ranks.py"), "--deepspeed_config", ds_file(tmp_path, 16, 4, "fp32"),
         "--data-dir", str(data), *SMALL, "--epochs", "2", "--warmup-epochs", "1", "--out-dir", str(out),
         "--wandb-mode", "offline", "--log-every", "1"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    ranks = json.loads(report.read_text())["ranks"]
    # 4 ranks, 2 on each host; the launching host's variable (DeepSpeed's env file) reached every one.
    assert len(ranks) == 4 and ranks[0]["host"] == ranks[1]["host"] != ranks[2]["host"] == ranks[3]["host"]
    assert {r["probe"] for r in ranks} == {"set on the launching host"}
    for epoch in ("0", "1"):
        slices = []
        for rank, seen in enumerate(ranks):
            start, end = shard_bounds(45, rank, 4)
            # 3 optimizer steps x 4 images per rank; its first `end - start` are its slice of the epoch.
            assert len(seen["seen"][epoch]) == 12 and len(set(seen["seen"][epoch][: end - start])) == end - start
            slices.append(set(seen["seen"][epoch][: end - start]))
        assert sum(map(len, slices)) == 45 and set().union(*slices) == set(range(45))
    assert len({r["params"] for r in ranks}) == 1  # bit-identical weights on every rank of both hosts
    # Batch-norm statistics are each rank's own (Goyal et al.; --sync-bn is the opt-in).
    assert len({r["bn_means"] for r in ranks}) == 4
    # Written once, by rank 0, into the shared run folder.
    epochs, summary = metrics(out)
    assert [e["epoch"] for e in epochs] == [0, 1] and summary["steps"] == 6
    steps = [json.loads(x)["step"] for x in (out / "steps.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7)) and len(list((out / "wandb").glob("offline-run-*"))) == 1
    assert run_file(out).exists() and [p.name for p in checkpoint.complete(out / "checkpoints")] == [
        checkpoint.tag(3), checkpoint.tag(6)]  # fmt: skip
    # Validation is exact across hosts: pipeline.evaluate on both hosts counts what one process counts, and the
    # run's own validation (every rank with rank 0's batch-norm statistics) agrees with them.
    counts = []
    for command in (
        [
            DEEPSPEED,
            "--hostfile",
            str(hosts.hostfile(2)),
            "--master_port",
            str(free_port()),
            str(ROOT / "pipeline" / "evaluate.py"),
        ],
        [sys.executable, "-m", "pipeline.evaluate"],
    ):
        result = tmp_path / f"eval-{len(counts)}.json"
        proc = procs.run([*command, "--checkpoint", str(out), "--data-dir", str(data), "--out", str(result),
                               "--data-threads", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                              env=env)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
        counts.append(json.loads(result.read_text()))
    assert [(c["world_size"], c["images"]) for c in counts] == [(4, 21), (1, 21)]
    assert counts[0]["top1"] == counts[1]["top1"] and counts[0]["top5"] == counts[1]["top5"]
    assert abs(epochs[-1]["val_top1"] - counts[1]["top1"]) <= 100 / 21 + 1e-9  # at most one image (summation order)


def test_a_host_killed_ends_the_job_and_resume_continues(hosts, tmp_path):
    """kill -9 of every process on the second host mid-training: the first host's ranks end within
    --dist-timeout instead of hanging, and --resume auto continues from the last complete checkpoint."""
    data, out = labelled_set(tmp_path / "data", train=45, val=21), tmp_path / "run"
    env = hosts.env({"OMP_NUM_THREADS": "1"})
    args = [DEEPSPEED, "--hostfile", str(hosts.hostfile(2)), "--master_port", str(free_port()),
            str(ROOT / "pipeline" / "train.py"), "--deepspeed_config", ds_file(tmp_path, 16, 4, "fp32"),
            "--data-dir", str(data), *SMALL, "--epochs", "30", "--warmup-epochs", "1", "--out-dir", str(out),
            "--wandb-mode", "disabled", "--save-every-steps", "2", "--dist-timeout", "30"]  # fmt: skip
    job = procs.start(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    deadline = time.monotonic() + 300
    while not [p for p in checkpoint.complete(out / "checkpoints") if p.name >= checkpoint.tag(4)]:
        assert time.monotonic() < deadline and job.poll() is None, "no checkpoint was written"
        time.sleep(0.2)
    hosts.kill(1)
    killed = time.monotonic()
    output, _ = job.communicate(timeout=120)
    assert job.returncode != 0 and time.monotonic() - killed < 60
    # The surviving host says once what was lost, without a traceback (pdsh prefixes each line with its host).
    lost = [x for x in output.splitlines() if x.startswith(f"{hosts.names[0]}: error: ")]
    assert len(lost) == 1 and ": a collective failed at step " in lost[0], output[-3000:]
    assert f": lost ranks 2, 3 on {hosts.names[1]} (" in lost[0], lost[0]
    assert "rerun with --resume auto (last complete checkpoint: step" in lost[0]
    assert f"{hosts.names[0]}: Traceback" not in output and f"{hosts.names[0]}: [rank0]: Traceback" not in output
    newest = checkpoint.complete(out / "checkpoints")[-1]
    step = json.loads((newest / checkpoint.COMPLETE).read_text())["step"]
    # Every rank of the dead job is gone from both hosts before the resume.
    deadline = time.monotonic() + 60
    while any(hosts.pids(h, "train.py") for h in (0, 1)):
        assert time.monotonic() < deadline, "ranks of the killed job are still running"
        time.sleep(0.2)
    args[args.index("--master_port") + 1] = str(free_port())
    resumed = procs.run([*args, "--resume", "auto", "--max-steps", str(step + 2)], capture_output=True, text=True,
                             timeout=600, env=env, cwd=ROOT)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:]
    assert f"resumed from {newest} at step {step}" in resumed.stdout
    assert checkpoint.complete(out / "checkpoints")[-1].name == checkpoint.tag(step + 2)


def launch(hosts, tmp_path, data, *flags, hostfile=None, script="pipeline/train.py") -> list[str]:
    """The user's command across the test hosts (2 slots each unless `hostfile`), B=16 in micro-batches of 4."""
    return [DEEPSPEED, "--hostfile", str(hostfile or hosts.hostfile(2)), "--master_port", str(free_port()),
            str(ROOT / script), "--deepspeed_config", ds_file(tmp_path, 16, 4, "fp32"), "--data-dir", str(data),
            *SMALL, "--warmup-epochs", "1", "--out-dir", str(tmp_path / "run"), "--wandb-mode", "disabled",
            *flags]  # fmt: skip


def test_sync_bn_across_hosts_gives_every_rank_the_same_statistics(hosts, tmp_path):
    data, report = labelled_set(tmp_path / "data", train=45, val=21), tmp_path / "ranks.json"
    env = hosts.env({"RANKS_REPORT": str(report), "OMP_NUM_THREADS": "1"})
    args = launch(
        hosts, tmp_path, data, "--epochs", "2", "--max-steps", "3", "--sync-bn", script="tests/train_ranks.py"
    )
    proc = procs.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    ranks = json.loads(report.read_text())["ranks"]
    assert len({r["host"] for r in ranks}) == 2 and len(ranks) == 4
    # Statistics over the global batch: the same on all 4 ranks of both hosts (without it they differ, above).
    assert len({r["bn_means"] for r in ranks}) == 1 and len({r["params"] for r in ranks}) == 1


def test_a_host_whose_link_goes_down_ends_the_job_within_the_timeout(hosts, tmp_path):
    """A partition: the second host's link goes down mid-training, its sockets stay open and silent. The first
    host's ranks give up after --dist-timeout and say once which ranks were lost; the cut-off host's ranks end too,
    and the launcher returns (ssh's keep-alive ends its session with the cut-off host)."""
    data, out, timeout = labelled_set(tmp_path / "data", train=45, val=21), tmp_path / "run", 20
    args = launch(hosts, tmp_path, data, "--epochs", "30", "--save-every-steps", "2", "--dist-timeout", str(timeout))
    job = procs.start(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                           env=hosts.env({"OMP_NUM_THREADS": "1"}))  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not [p for p in checkpoint.complete(out / "checkpoints") if p.name >= checkpoint.tag(2)]:
            assert time.monotonic() < deadline and job.poll() is None, "training did not start"
            time.sleep(0.2)
        hosts.link(1, up=False)
        cut = time.monotonic()
        output, _ = job.communicate(timeout=timeout + 60)
        ended = time.monotonic() - cut
        assert job.returncode != 0 and ended < timeout + 30, ended
        lost = [x for x in output.splitlines() if x.startswith(f"{hosts.names[0]}: error: ")]
        assert len(lost) == 1 and f": lost ranks 2, 3 on {hosts.names[1]} (" in lost[0], output[-3000:]
        assert f"{hosts.names[0]}: Traceback" not in output and f"{hosts.names[0]}: [rank0]: Traceback" not in output
        # The cut-off host's ranks end on their own (their collective times out too); nothing is left running.
        while hosts.pids(1, "train.py") or hosts.pids(0, "train.py"):
            left = {h: [command_line(p)[:150] for p in hosts.pids(h, "train.py")] for h in (0, 1)}
            assert time.monotonic() - cut < timeout + 40, f"still running after the partition: {left}"
            time.sleep(0.5)
    finally:
        job.kill()
        hosts.link(1, up=True)


def test_a_hostfile_with_an_unreachable_host_fails_before_training_in_one_line(hosts, tmp_path):
    data = labelled_set(tmp_path / "data", train=45, val=21)
    env = hosts.env({"OMP_NUM_THREADS": "1"})
    # No host answers at .99 of the test subnet: its ranks never start, the first host's wait --join-timeout.
    hostfile = hosts.hostfile(2, [hosts.names[0], f"{hosts.subnet}.99"])
    began = time.monotonic()
    proc = procs.run(launch(hosts, tmp_path, data, "--epochs", "2", "--join-timeout", "20", hostfile=hostfile),
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)  # fmt: skip
    assert proc.returncode != 0 and time.monotonic() - began < 90
    errors = [x for x in (proc.stdout + proc.stderr).splitlines() if ": error: " in x or x.startswith("error: ")]
    assert len(errors) == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert errors[0].startswith(f"{hosts.names[0]}: error: only 2 of 4 ranks joined within --join-timeout 20s: ")
    assert "Traceback" not in proc.stdout + proc.stderr and not (tmp_path / "run" / "steps.jsonl").exists()
    # An unreachable first host is DeepSpeed's own check, before anything starts.
    hostfile = hosts.hostfile(2, [f"{hosts.subnet}.99", hosts.names[0]])
    proc = procs.run(launch(hosts, tmp_path, data, "--epochs", "2", hostfile=hostfile), capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)  # fmt: skip
    assert proc.returncode != 0 and f"host={hosts.subnet}.99 was not reachable via ssh" in proc.stderr


def test_slots_that_do_not_divide_the_batch_fail_before_training_in_one_line(hosts, tmp_path):
    data = labelled_set(tmp_path / "data", train=45, val=21)
    # 2 hosts x 3 slots: 6 ranks cannot share a global batch of 16.
    proc = procs.run(launch(hosts, tmp_path, data, "--epochs", "2", hostfile=hosts.hostfile(3)),
                          capture_output=True, text=True, timeout=300, env=hosts.env({}), cwd=ROOT)  # fmt: skip
    assert proc.returncode != 0
    errors = [x for x in (proc.stdout + proc.stderr).splitlines() if ": error: " in x]
    assert len(errors) == 1 and errors[0].startswith(f"{hosts.names[0]}: error: "), proc.stdout[-3000:] + proc.stderr
    assert "16" in errors[0] and "6" in errors[0] and not (tmp_path / "run" / "steps.jsonl").exists()
