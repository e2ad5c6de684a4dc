"""Multi-node as users launch it: `deepspeed --hostfile hosts pipeline/train.py ...` across two test hosts (network
namespaces with their own sshd, reached through pdsh), 2 ranks each, gloo on the CPU."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline import checkpoint
from pipeline.data.shards import shard_bounds
from pipeline.launch import free_port
from tests import procs
from tests.hosts import Hosts, command_line
from tests.runs import ROOT, SMALL, ds_file, metrics
from tests.shardsets import labelled_set
from tests.wandb_files import run_file

pytestmark = pytest.mark.slow
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


@pytest.fixture(scope="module")
def module_hosts(tmp_path_factory):
    """Two test hosts for this module's tests."""
    made = Hosts(tmp_path_factory.mktemp("hosts"))
    yield made
    made.close()


@pytest.fixture
def hosts(module_hosts):
    """The module's hosts, each up with its sshd again after whatever the last test did to it."""
    module_hosts.ready()
    return module_hosts


class ProcessListings:
    """Every command line `ps` shows on the test hosts, sampled every 0.2 s while inside."""

    def __init__(self, hosts: Hosts):
        self.hosts, self.seen, self.stop = hosts, set(), threading.Event()

    def __enter__(self):
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.2):
            for ns in self.hosts.namespaces:
                command = ["ip", "netns", "exec", ns, "ps", "-eww", "-o", "args"]
                self.seen.update(subprocess.run(command, capture_output=True, text=True).stdout.splitlines())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


KEY = "0123456789abcdef0123456789abcdef01234567"


def netrc_with_the_key(folder: Path) -> Path:
    """What `wandb login` writes: the API key for api.wandb.ai, readable by its owner only."""
    path = folder / "netrc"
    path.write_text(f"machine api.wandb.ai\n  login user\n  password {KEY}\n")
    path.chmod(0o600)
    return path


def test_two_hosts_train_as_one_job(hosts, tmp_path):
    """Also: following the docs (NETRC in .deepspeed_env, no WANDB_API_KEY), no process on either host shows the
    wandb key while the job runs."""
    data, out, report = labelled_set(tmp_path / "data", train=45, val=21), tmp_path / "run", tmp_path / "ranks.json"
    netrc = netrc_with_the_key(tmp_path)
    env = hosts.env({"RANKS_REPORT": str(report), "PIPELINE_PROBE": "set on the launching host",
                     "OMP_NUM_THREADS": "1", "NETRC": str(netrc)})  # fmt: skip
    env.pop("WANDB_API_KEY", None)
    listings = ProcessListings(hosts)
    with listings:
        proc = procs.run(
        [DEEPSPEED, "--hostfile", str(hosts.hostfile(2)), "--master_port", str(free_port()),
         str(ROOT / "tests" / "train_ranks.py"), "--deepspeed_config", ds_file(tmp_path, 16, 4, "fp32"),
         "--data-dir", str(data), *SMALL, "--epochs", "2", "--warmup-epochs", "1", "--out-dir", str(out),
         "--wandb-mode", "offline", "--log-every", "1"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    # The ranks ran while sampled (the launcher's pdsh line and each rank's), and no command line held the key.
    assert any("train_ranks.py" in line and "--deepspeed_config" in line for line in listings.seen)
    assert not [line for line in listings.seen if KEY in line]
    # wandb on rank 0 finds the key where the docs put it (its own reader; offline here: no traffic).
    from wandb.sdk.lib.wbauth import wbnetrc

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NETRC", str(netrc))
        assert wbnetrc.read_netrc_auth(host="https://api.wandb.ai") == KEY
    ranks = json.loads(report.read_text())["ranks"]
    # 4 ranks, 2 on each host; the launching host's variable (DeepSpeed's env file) reached every one.
    assert len(ranks) == 4
    assert ranks[0]["host"] == ranks[1]["host"] != ranks[2]["host"] == ranks[3]["host"]
    assert {r["probe"] for r in ranks} == {"set on the launching host"}
    for epoch in ("0", "1"):
        slices = []
        for rank, seen in enumerate(ranks):
            start, end = shard_bounds(45, rank, 4)
            # 3 optimizer steps x 4 images per rank; its first `end - start` are its slice of the epoch.
            assert len(seen["seen"][epoch]) == 12
            assert len(set(seen["seen"][epoch][: end - start])) == end - start
            slices.append(set(seen["seen"][epoch][: end - start]))
        assert sum(map(len, slices)) == 45
        assert set().union(*slices) == set(range(45))
    assert len({r["params"] for r in ranks}) == 1  # bit-identical weights on every rank of both hosts
    # Batch-norm statistics are each rank's own (Goyal et al.; --sync-bn is the opt-in).
    assert len({r["bn_means"] for r in ranks}) == 4
    # Written once, by rank 0, into the shared run folder.
    epochs, summary = metrics(out)
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert summary["steps"] == 6
    steps = [json.loads(x)["step"] for x in (out / "steps.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1
    assert run_file(out).exists()
    assert [p.name for p in checkpoint.complete(out / "checkpoints")] == [checkpoint.tag(3), checkpoint.tag(6)]
    # Validation across hosts: pipeline.evaluate on both hosts counts every image once, and the run's own last
    # validation (every rank with rank 0's batch-norm statistics) agrees with it. Ranks count what one process
    # counts: tests/test_evaluate_export.py.
    result = tmp_path / "eval.json"
    command = [DEEPSPEED, "--hostfile", str(hosts.hostfile(2)), "--master_port", str(free_port()),
               str(ROOT / "pipeline" / "evaluate.py"), "--checkpoint", str(out), "--data-dir", str(data), "--out",
               str(result), "--data-threads", "1"]  # fmt: skip
    proc = procs.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    counted = json.loads(result.read_text())
    assert (counted["world_size"], counted["images"]) == (4, 21)
    assert abs(epochs[-1]["val_top1"] - counted["top1"]) <= 100 / 21 + 1e-9  # at most one image (summation order)


def test_a_host_killed_ends_the_job_and_resume_continues(hosts, tmp_path):
    """kill -9 of every process on the second host mid-training: the first host's ranks end within
    --dist-timeout instead of hanging, and none is left on either host for the rerun. (--resume auto after a lost
    node, under the launcher that lost it: tests/test_launchers.py, SLURM and MPI; the resume itself:
    tests/test_train.py.)"""
    data, out = labelled_set(tmp_path / "data", train=45, val=21), tmp_path / "run"
    env = hosts.env({"OMP_NUM_THREADS": "1"})
    args = [DEEPSPEED, "--hostfile", str(hosts.hostfile(2)), "--master_port", str(free_port()),
            str(ROOT / "pipeline" / "train.py"), "--deepspeed_config", ds_file(tmp_path, 16, 4, "fp32"),
            "--data-dir", str(data), *SMALL, "--epochs", "30", "--warmup-epochs", "1", "--out-dir", str(out),
            "--wandb-mode", "disabled", "--save-every-steps", "2", "--dist-timeout", "30"]  # fmt: skip
    job = procs.start(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    deadline = time.monotonic() + 300
    while not [p for p in checkpoint.complete(out / "checkpoints") if p.name >= checkpoint.tag(2)]:
        assert time.monotonic() < deadline, "no checkpoint was written"
        assert job.poll() is None, "no checkpoint was written"
        time.sleep(0.2)
    hosts.kill(1)
    killed = time.monotonic()
    output, _ = job.communicate(timeout=120)
    assert job.returncode != 0
    assert time.monotonic() - killed < 60
    # The surviving host says once what was lost, without a traceback (pdsh prefixes each line with its host).
    lost = [x for x in output.splitlines() if x.startswith(f"{hosts.names[0]}: error: ")]
    assert len(lost) == 1, output[-3000:]
    assert ": a collective failed at step " in lost[0], output[-3000:]
    assert f": lost ranks 2, 3 on {hosts.names[1]} (" in lost[0], lost[0]
    assert "rerun with --resume auto (last complete checkpoint: step" in lost[0]
    assert f"{hosts.names[0]}: Traceback" not in output
    assert f"{hosts.names[0]}: [rank0]: Traceback" not in output
    newest = checkpoint.complete(out / "checkpoints")[-1]
    assert f"(last complete checkpoint: {newest.name})" in lost[0]
    # Every rank of the dead job is gone from both hosts: a rerun starts clean.
    deadline = time.monotonic() + 60
    while any(hosts.pids(h, "train.py") for h in (0, 1)):
        assert time.monotonic() < deadline, "ranks of the killed job are still running"
        time.sleep(0.2)


def launch(hosts, tmp_path, data, *flags, hostfile=None, script="pipeline/train.py") -> list[str]:
    """The user's command across the test hosts (2 slots each unless `hostfile`), B=16 in micro-batches of 4."""
    return [DEEPSPEED, "--hostfile", str(hostfile or hosts.hostfile(2)), "--master_port", str(free_port()),
            str(ROOT / script), "--deepspeed_config", ds_file(tmp_path, 16, 4, "fp32"), "--data-dir", str(data),
            *SMALL, "--warmup-epochs", "1", "--out-dir", str(tmp_path / "run"), "--wandb-mode", "disabled",
            *flags]  # fmt: skip


def test_sync_bn_across_hosts_gives_every_rank_the_same_statistics(hosts, tmp_path):
    """Also, on the way, what the docs warn against: with the wandb key in .deepspeed_env, DeepSpeed's launcher
    writes it onto the pdsh command line, where `ps` on the launching host shows it, and rank 0 says so."""
    data, report = labelled_set(tmp_path / "data", train=45, val=21), tmp_path / "ranks.json"
    env = hosts.env({"RANKS_REPORT": str(report), "OMP_NUM_THREADS": "1"})
    # The file where users keep it: .deepspeed_env in the folder the job starts from (shared by the hosts).
    (tmp_path / ".deepspeed_env").write_text(Path(env.pop("DS_ENV_FILE")).read_text() + f"WANDB_API_KEY={KEY}\n")
    args = launch(
        hosts, tmp_path, data, "--epochs", "2", "--max-steps", "3", "--sync-bn", script="tests/train_ranks.py"
    )
    with ProcessListings(hosts) as listings:
        proc = procs.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    ranks = json.loads(report.read_text())["ranks"]
    assert len({r["host"] for r in ranks}) == 2
    assert len(ranks) == 4
    # Statistics over the global batch: the same on all 4 ranks of both hosts (without it they differ, above).
    assert len({r["bn_means"] for r in ranks}) == 1
    assert len({r["params"] for r in ranks}) == 1
    # The key, in ps and in the run's note.
    assert [line for line in listings.seen if KEY in line and line.startswith("pdsh ")]
    (note,) = [x for x in proc.stdout.splitlines() if "WANDB_API_KEY is in" in x]
    assert note == (
        f"{hosts.names[0]}: note: WANDB_API_KEY is in {tmp_path / '.deepspeed_env'}, whose lines DeepSpeed's "
        "launchers put on every node's command line: ps shows the key there to every user of the machine; log in "
        "with `wandb login` instead (a shared home), or put NETRC=<a netrc file only you can read> in "
        ".deepspeed_env (docs/multinode.md)"
    )


def test_a_host_whose_link_goes_down_ends_the_job_within_the_timeout(hosts, tmp_path):
    """A partition: the second host's link goes down mid-training, its sockets stay open and silent. The first
    host's ranks give up after --dist-timeout and say once which ranks were lost; the cut-off host's ranks end too,
    and the launcher returns (ssh's keep-alive ends its session with the cut-off host)."""
    data, out, timeout = labelled_set(tmp_path / "data", train=45, val=21), tmp_path / "run", 8
    args = launch(hosts, tmp_path, data, "--epochs", "30", "--save-every-steps", "2", "--dist-timeout", str(timeout))
    job = procs.start(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                           env=hosts.env({"OMP_NUM_THREADS": "1"}))  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not [p for p in checkpoint.complete(out / "checkpoints") if p.name >= checkpoint.tag(2)]:
            assert time.monotonic() < deadline, "training did not start"
            assert job.poll() is None, "training did not start"
            time.sleep(0.2)
        hosts.link(1, up=False)
        cut = time.monotonic()
        output, _ = job.communicate(timeout=timeout + 60)
        ended = time.monotonic() - cut
        assert job.returncode != 0, ended
        assert ended < timeout + 30, ended
        lost = [x for x in output.splitlines() if x.startswith(f"{hosts.names[0]}: error: ")]
        assert len(lost) == 1, output[-3000:]
        assert f": lost ranks 2, 3 on {hosts.names[1]} (" in lost[0], output[-3000:]
        assert f"{hosts.names[0]}: Traceback" not in output
        assert f"{hosts.names[0]}: [rank0]: Traceback" not in output
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
    proc = procs.run(launch(hosts, tmp_path, data, "--epochs", "2", "--join-timeout", "6", hostfile=hostfile),
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)  # fmt: skip
    assert proc.returncode != 0
    assert time.monotonic() - began < 90
    errors = [x for x in (proc.stdout + proc.stderr).splitlines() if ": error: " in x or x.startswith("error: ")]
    assert len(errors) == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert errors[0].startswith(f"{hosts.names[0]}: error: only 2 of 4 ranks joined within --join-timeout 6s: ")
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "steps.jsonl").exists()
    # (An unreachable first host is DeepSpeed's own ssh check, made before anything starts.)


def test_slots_that_do_not_divide_the_batch_fail_before_training_in_one_line(hosts, tmp_path):
    data = labelled_set(tmp_path / "data", train=45, val=21)
    # 2 hosts x 1 slot: 2 ranks of micro-batch 4 cannot share a global batch of 12.
    command = launch(hosts, tmp_path, data, "--epochs", "2", hostfile=hosts.hostfile(1))
    command[command.index("--deepspeed_config") + 1] = ds_file(tmp_path, 12, 4, "fp32")
    proc = procs.run(command, capture_output=True, text=True, timeout=300, env=hosts.env({}), cwd=ROOT)
    assert proc.returncode != 0
    errors = [x for x in (proc.stdout + proc.stderr).splitlines() if ": error: " in x]
    assert len(errors) == 1, proc.stdout[-3000:] + proc.stderr
    assert errors[0].startswith(f"{hosts.names[0]}: error: "), proc.stdout[-3000:] + proc.stderr
    assert "train_batch_size 12 is not a multiple of micro-batch 4 x 2 ranks" in errors[0]
    assert not (tmp_path / "run" / "steps.jsonl").exists()


def test_a_host_a_test_left_killed_is_up_again_for_the_next(module_hosts):
    """The fixture's ready(): a host whose processes were killed (sshd too) and its link taken down, as a test that
    failed halfway would leave it, answers ssh again."""

    def ssh_ok() -> bool:
        env = module_hosts.env({})
        proc = subprocess.run(["ssh", module_hosts.names[1], "true"], env=env, capture_output=True, timeout=30)
        return proc.returncode == 0

    assert ssh_ok()
    for pid in module_hosts.pids(1, running="sshd"):
        os.kill(pid, signal.SIGKILL)
    module_hosts.link(1, up=False)
    assert not ssh_ok()
    module_hosts.ready()
    assert ssh_ok()
