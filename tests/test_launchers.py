"""SLURM and MPI as users launch them, across two test hosts (network namespaces, tests/hosts.py) with 2 ranks
each, gloo on the CPU: `sbatch` with examples/slurm/train.sbatch, `deepspeed --launcher slurm`, plain `srun`;
`mpirun`, `deepspeed --launcher openmpi`. Each forms one job; a killed node ends it with one line; `--resume auto`
under the same launcher continues. The pdsh launcher's own tests: tests/test_multinode.py."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import checkpoint
from pipeline.data.shards import shard_bounds
from pipeline.launch import without_launcher
from tests import procs
from tests.hosts import Hosts, Slurm
from tests.runs import ROOT, SMALL, ds_file, metrics
from tests.shardsets import labelled_set

pytestmark = pytest.mark.slow
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
# The test hosts share this machine's host name, which resolves to none of their addresses: gloo is told its
# interface (on a cluster each node's name resolves to its own address). One thread per rank: 4 ranks, 2 cores.
HOST_ENV = {"GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory):
    """Two test hosts, with a SLURM cluster of them."""
    hosts = Hosts(tmp_path_factory.mktemp("hosts"))
    try:
        slurm = Slurm(hosts)
    except Exception:
        hosts.close()
        raise
    yield hosts, slurm
    slurm.close()
    hosts.close()


@pytest.fixture
def cluster(module_cluster):
    """The module's cluster, every host and node up again after whatever the last test did to it (a kill it did not
    live to undo must not fail the tests after it)."""
    hosts, slurm = module_cluster
    hosts.ready()
    slurm.ready()
    return module_cluster


def assert_one_job(report: Path, out: Path, images: int = 45, epochs: int = 2) -> None:
    """What the pdsh tests assert: 4 ranks, 2 per host; disjoint, complete slices; identical weights; one
    metrics file written by rank 0."""
    ranks = json.loads(report.read_text())["ranks"]
    assert len(ranks) == 4
    assert ranks[0]["host"] == ranks[1]["host"] != ranks[2]["host"] == ranks[3]["host"]
    for epoch in map(str, range(epochs)):
        slices = []
        for rank, seen in enumerate(ranks):
            start, end = shard_bounds(images, rank, 4)
            assert len(set(seen["seen"][epoch][: end - start])) == end - start
            slices.append(set(seen["seen"][epoch][: end - start]))
        assert sum(map(len, slices)) == images
        assert set().union(*slices) == set(range(images))
    assert len({r["params"] for r in ranks}) == 1
    rows, summary = metrics(out)
    assert [r["epoch"] for r in rows] == list(range(epochs))
    assert summary["steps"] == 3 * epochs


def reporting_python(folder: Path) -> Path:
    """A `python` that runs tests/train_ranks.py in place of pipeline/train.py (its first argument): the same run,
    which also reports what each rank saw."""
    path = folder / "python"
    path.write_text(f'#!/bin/sh\nshift\nexec {sys.executable} {ROOT / "tests" / "train_ranks.py"} "$@"\n')
    path.chmod(0o755)
    return path


def test_sbatch_with_the_example_script_is_one_job(cluster, tmp_path):
    hosts, slurm = cluster
    data, out, report = labelled_set(tmp_path / "data", train=45, val=21), tmp_path / "run", tmp_path / "ranks.json"
    # Without this process's own rendezvous variables (an earlier test's in-process run set them): srun's tasks
    # inherit sbatch's environment, and a RANK there would make each task a job of its own.
    config = ds_file(tmp_path, 16, 4, "fp32")
    env = {**without_launcher(os.environ), **slurm.env, "DATA_DIR": str(data), "CONFIG": config, "OUT_DIR": str(out),
           "PYTHON": str(reporting_python(tmp_path)), "RANKS_REPORT": str(report), **HOST_ENV}  # fmt: skip
    command = ["sbatch", "--wait", "--nodes", "2", "--ntasks-per-node", "2", "--gpus-per-node", "0",
               "--cpus-per-task", "1", "--output", str(tmp_path / "job.out"), str(ROOT / "examples/slurm/train.sbatch"),
               *SMALL, "--epochs", "1", "--warmup-epochs", "0", "--wandb-mode", "disabled", "--log-every", "1",
               "--join-timeout", "60"]  # fmt: skip
    proc = procs.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert proc.returncode == 0, proc.stderr + log[-4000:]
    assert_one_job(report, out, epochs=1)


def wait_for_checkpoint(out: Path, job: subprocess.Popen, step: int, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not [p for p in checkpoint.complete(out / "checkpoints") if p.name >= checkpoint.tag(step)]:
        assert time.monotonic() < deadline, "no checkpoint was written"
        assert job.poll() is None, "no checkpoint was written"
        time.sleep(0.2)


def kill_then_resume(hosts, job, out, resume_command, env, after_kill=None, stopped_by_launcher=False) -> None:
    """kill -9 every process of the second host while the job trains past step 2: the first host's ranks end
    within the job's --dist-timeout with one line (per node) naming the lost ranks, or saying that the launcher
    stopped them (`stopped_by_launcher`: True, False, or None where either may come first); then
    `resume_command` (the same launcher) continues from the last complete checkpoint."""
    wait_for_checkpoint(out, job, 2)
    hosts.kill(1)
    killed = time.monotonic()
    output, _ = job.communicate(timeout=120)
    ended = time.monotonic() - killed
    if after_kill:
        after_kill()
    # The first host's line, also the last line of metrics.jsonl (rank 0's sinks).
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1]).get("fault", output[-4000:])
    assert line.startswith("error: rank 0 of 4 on ")
    assert "; the job is over: " in line
    assert "--resume auto" in line
    if stopped_by_launcher or (stopped_by_launcher is None and "a collective failed at step" not in line):
        # mpirun ends every rank the moment it loses a node's daemon (SIGTERM, then SIGKILL 1 s later), and its
        # ending may cut the line off its output.
        assert "stopped by the launcher (SIGTERM) at step" in line, line
    else:
        assert "a collective failed at step" in line, line
        assert f"lost ranks 2, 3 on {hosts.names[1]}" in line, line
        assert line in output.splitlines(), output[-4000:]
    assert ended < DIST_TIMEOUT + 30, ended
    step = json.loads((checkpoint.complete(out / "checkpoints")[-1] / checkpoint.COMPLETE).read_text())["step"]
    resumed = procs.run([*resume_command, "--resume", "auto", "--max-steps", str(step + 2)], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / checkpoint.tag(step)} at step {step}" in resumed.stdout
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["steps"] == step + 2


DIST_TIMEOUT = 30


def test_deepspeed_launcher_slurm_one_job_a_killed_node_ends_and_srun_resumes_it(cluster, tmp_path):
    """`deepspeed --launcher slurm --hostfile` runs srun: its 4 tasks form one job (the line names ranks 2 and 3 on
    the second host); plain srun resumes it."""
    hosts, slurm = cluster
    data, out = labelled_set(tmp_path / "data", train=45, val=21), tmp_path / "run"
    env = {**hosts.env(HOST_ENV), **HOST_ENV, **slurm.env}
    flags = ["--deepspeed_config", ds_file(tmp_path, 16, 4, "fp32"), "--data-dir", str(data), *SMALL, "--epochs", "30",
             "--warmup-epochs", "1", "--out-dir", str(out), "--wandb-mode", "disabled", "--save-every-steps", "2",
             "--dist-timeout", str(DIST_TIMEOUT), "--join-timeout", "60"]  # fmt: skip
    job = procs.start([DEEPSPEED, "--launcher", "slurm", "--hostfile", str(hosts.hostfile(2)),
                       str(ROOT / "pipeline" / "train.py"), *flags], stdout=subprocess.PIPE,
                      stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)  # fmt: skip
    srun = ["srun", "-N", "2", "-n", "4", sys.executable, str(ROOT / "pipeline" / "train.py"), *flags]

    def node_back():
        slurm.start_slurmd(1)
        slurm.wait_idle()

    # srun ends the step's other tasks (SIGTERM) once it sees the node fail, which may come before the survivors'
    # collective fails: either line.
    kill_then_resume(hosts, job, out, srun, env, after_kill=node_back, stopped_by_launcher=None)


def mpirun(hosts, *variables: str) -> list[str]:
    """mpirun of 2 ranks on each test host, started over ssh, passing `variables` to every rank."""
    hosts_arg = ",".join(f"{name}:2" for name in hosts.names)
    # ORTE's own traffic between mpirun and the hosts' daemons goes over the hosts' subnet.
    command = ["mpirun", "-np", "4", "-H", hosts_arg, "--mca", "oob_tcp_if_include", f"{hosts.subnet}.0/24"]
    for name in (*variables, *HOST_ENV, procs.MARK):
        command += ["-x", name]
    return command


# mpirun refuses root unless told; the tests run as root.
MPI_AS_ROOT = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def test_mpirun_across_two_hosts_is_one_job(cluster, tmp_path):
    hosts, _ = cluster
    data, out, report = labelled_set(tmp_path / "data", train=45, val=21), tmp_path / "run", tmp_path / "ranks.json"
    env = {**hosts.env({}), **HOST_ENV, **MPI_AS_ROOT, "MASTER_ADDR": hosts.names[0], "RANKS_REPORT": str(report)}
    command = [*mpirun(hosts, "MASTER_ADDR", "RANKS_REPORT"), sys.executable, str(ROOT / "tests" / "train_ranks.py"),
               "--deepspeed_config", ds_file(tmp_path, 16, 4, "fp32"), "--data-dir", str(data), *SMALL, "--epochs", "2",
               "--warmup-epochs", "1", "--out-dir", str(out), "--wandb-mode", "disabled", "--log-every", "1",
               "--join-timeout", "60"]  # fmt: skip
    proc = procs.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_one_job(report, out)


def test_deepspeed_launcher_openmpi_one_job_a_killed_node_ends_and_mpirun_resumes_it(cluster, tmp_path):
    """`deepspeed --launcher openmpi --hostfile` runs mpirun, with MASTER_ADDR from .deepspeed_env as the docs say;
    plain mpirun resumes it."""
    hosts, _ = cluster
    data, out = labelled_set(tmp_path / "data", train=45, val=21), tmp_path / "run"
    env = {**hosts.env({**HOST_ENV, "MASTER_ADDR": hosts.names[0]}), **HOST_ENV, **MPI_AS_ROOT,
           "MASTER_ADDR": hosts.names[0]}  # fmt: skip
    flags = ["--deepspeed_config", ds_file(tmp_path, 16, 4, "fp32"), "--data-dir", str(data), *SMALL, "--epochs", "30",
             "--warmup-epochs", "1", "--out-dir", str(out), "--wandb-mode", "disabled", "--save-every-steps", "2",
             "--dist-timeout", str(DIST_TIMEOUT), "--join-timeout", "60"]  # fmt: skip
    launcher_args = f"--mca oob_tcp_if_include {hosts.subnet}.0/24"
    job = procs.start([DEEPSPEED, "--launcher", "openmpi", "--launcher_args", launcher_args, "--hostfile",
                       str(hosts.hostfile(2)), str(ROOT / "pipeline" / "train.py"), *flags], stdout=subprocess.PIPE,
                      stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)  # fmt: skip
    plain = [*mpirun(hosts, "MASTER_ADDR"), sys.executable, str(ROOT / "pipeline" / "train.py"), *flags]
    kill_then_resume(hosts, job, out, plain, env, stopped_by_launcher=True)
