"""Which launcher started this process, and the rendezvous it means: RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT, the variables torch's process group reads.

- torchrun and DeepSpeed's own launcher (`deepspeed [--hostfile]`, pdsh across nodes) set them: used as they are.
- SLURM (`srun`, in `sbatch` or `salloc`; also `deepspeed --launcher slurm`, which runs srun): rank, world size and
  local rank from SLURM_PROCID, SLURM_STEP_NUM_TASKS and SLURM_LOCALID; the master is the first host of the step's
  node list; the port is derived from the job id.
- MPI (`mpirun`/`mpiexec` of Open MPI, MPICH or Intel MPI (PMI), MVAPICH; also DeepSpeed's MPI launchers): rank,
  world size and local rank from the MPI implementation's variables; the master address from MASTER_ADDR (MPI
  does not say where rank 0 runs; DeepSpeed's MPICH and Intel MPI launchers export it), or 127.0.0.1 when every
  rank is on this node; the port from the job id.
- None of these: a one-process job.

MASTER_ADDR and MASTER_PORT, where set, win over what is derived. A launch that shows more than one task without
what is needed to join them is refused (LaunchError), so that N tasks never train N separate copies.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

# The torch variables a launcher sets, or this module sets from the launcher's own.
TORCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# torch's default rendezvous port, where there is no job id to derive one from.
DEFAULT_PORT = 29500
# MPI implementations: (launcher, rank, world size, local rank, local size, job id) variables.
MPI = (
    (
        "Open MPI",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "OMPI_MCA_ess_base_jobid",
    ),
    (
        "MVAPICH",
        "MV2_COMM_WORLD_RANK",
        "MV2_COMM_WORLD_SIZE",
        "MV2_COMM_WORLD_LOCAL_RANK",
        "MV2_COMM_WORLD_LOCAL_SIZE",
        None,
    ),
    ("MPICH or Intel MPI (PMI)", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", None),
)


class LaunchError(ValueError):
    """The launcher's variables show several tasks, but not how to join them (one line: what was seen, the fix)."""


@dataclass(frozen=True)
class Launch:
    """Who started this process and the rendezvous variables it stands for."""

    # "torch" (torchrun, deepspeed's launcher), "SLURM", an MPI implementation, or "none" (plain python).
    launcher: str
    variables: dict[str, str]

    @property
    def rank(self) -> int:
        return int(self.variables["RANK"])

    @property
    def world_size(self) -> int:
        return int(self.variables["WORLD_SIZE"])


def detect(env: Mapping[str, str] | None = None) -> Launch:
    """The launch this process is part of, from its environment (os.environ by default); LaunchError when it
    shows several tasks that could not form one job."""
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        return _torch(env)
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        return _slurm(env)
    for names in MPI:
        if names[2] in env:
            return _mpi(env, *names)
    if int(env.get("SLURM_NTASKS", 1)) > 1:
        raise LaunchError(
            f"SLURM_NTASKS={env['SLURM_NTASKS']} (job {env.get('SLURM_JOB_ID', '?')}), but this process is not a task "
            "of a job step (no SLURM_STEP_ID): start one task per GPU with srun, as in examples/slurm/train.sbatch "
            "(srun python pipeline/train.py ...)"
        )
    return Launch("none", _with_master({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}, env, 1, None))


_adopted: list[Launch] = []


def adopt() -> Launch:
    """Detect this process's launch and set its torch variables in os.environ. A later call finds those set and
    returns the same launch (a second detect would see torch's variables and take the launcher for torchrun)."""
    if _adopted and all(os.environ.get(k) == v for k, v in _adopted[0].variables.items()):
        return _adopted[0]
    _adopted[:] = [detect()]
    os.environ.update(_adopted[0].variables)
    return _adopted[0]


def _torch(env: Mapping[str, str]) -> Launch:
    """torchrun or DeepSpeed's launcher: their variables as set, after checking they are complete."""
    missing = [name for name in ("RANK", "WORLD_SIZE") if name not in env]
    world = int(env.get("WORLD_SIZE", 1))
    if missing and world > 1:
        raise LaunchError(
            f"WORLD_SIZE={world} but no {' or '.join(missing)} in the environment: start the job with torchrun or "
            "deepspeed, or unset WORLD_SIZE for a one-process run"
        )
    if world > 1 and "MASTER_ADDR" not in env:
        raise LaunchError(f"WORLD_SIZE={world} and RANK={env['RANK']}, but no MASTER_ADDR: set it to rank 0's node")
    variables = {name: env[name] for name in TORCH_VARIABLES if name in env}
    variables.setdefault("RANK", "0")
    variables.setdefault("WORLD_SIZE", str(world))
    variables.setdefault("LOCAL_RANK", "0")
    variables.setdefault("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", "1"))
    return Launch("torch", _with_master(variables, env, world, None))


def _slurm(env: Mapping[str, str]) -> Launch:
    """A task of an srun job step."""
    world = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
    variables = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(tasks_on_this_node(env)),
    }
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if world > 1 and not nodes and "MASTER_ADDR" not in env:
        raise LaunchError(
            f"SLURM step {env.get('SLURM_JOB_ID', '?')}.{env['SLURM_STEP_ID']} has {world} tasks but no "
            "SLURM_STEP_NODELIST or SLURM_JOB_NODELIST: set MASTER_ADDR to the node of task 0"
        )
    master = first_host(nodes) if nodes else None
    return Launch("SLURM", _with_master(variables, env, world, master, env.get("SLURM_JOB_ID")))


def _mpi(env: Mapping[str, str], name: str, rank: str, size: str, local: str, local_size: str, job) -> Launch:
    """A rank started by mpirun or mpiexec."""
    world = int(env.get(size, 1))
    if rank not in env or size not in env:
        raise LaunchError(f"{name}: {local} is set but not {rank} and {size}: start the job with mpirun -np N")
    here = int(env.get(local_size, world))
    variables = {"RANK": env[rank], "WORLD_SIZE": str(world), "LOCAL_RANK": env[local], "LOCAL_WORLD_SIZE": str(here)}
    master = "127.0.0.1" if here == world else None
    if master is None and "MASTER_ADDR" not in env:
        raise LaunchError(
            f"{name} started {world} ranks on several nodes ({size}={world}, {local_size}={here}), and MPI does not "
            "say where rank 0 runs: set MASTER_ADDR to the first node (mpirun -x MASTER_ADDR=<first host>; with "
            "deepspeed --launcher openmpi, a line MASTER_ADDR=<first host of the hostfile> in .deepspeed_env)"
        )
    return Launch(name, _with_master(variables, env, world, master, env.get(job) if job else None))


def _with_master(variables: dict, env: Mapping[str, str], world: int, master: str | None, job=None) -> dict:
    """The variables with MASTER_ADDR and MASTER_PORT: the environment's where set, else derived."""
    variables = dict(variables)
    variables["MASTER_ADDR"] = env.get("MASTER_ADDR") or master or "127.0.0.1"
    if "MASTER_PORT" in env:
        variables["MASTER_PORT"] = env["MASTER_PORT"]
    elif world == 1:
        variables["MASTER_PORT"] = str(free_port())
    else:
        variables["MASTER_PORT"] = str(job_port(job))
    return variables


def job_port(job: str | None) -> int:
    """The rendezvous port of a job: 15000 + its id modulo 40000, the same on every node (torch's 29500 without
    an id). Two job steps running at once in one job need MASTER_PORT."""
    digits = re.sub(r"\D", "", job or "")
    return 15000 + int(digits) % 40000 if digits else DEFAULT_PORT


def free_port() -> int:
    """A TCP port nothing listens on now, for a one-process rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Prefixes of the variables SLURM and MPI launchers give their tasks (LAUNCHER_VARIABLES holds torch's).
LAUNCHER_PREFIXES = ("SLURM_", "OMPI_COMM_WORLD_", "OMPI_MCA_ess_", "PMI_", "PMIX_", "MPI_LOCAL", "MV2_COMM_WORLD_")
LAUNCHER_VARIABLES = (*TORCH_VARIABLES, "LOCAL_SIZE")


def without_launcher(env: Mapping[str, str]) -> dict[str, str]:
    """`env` without any launcher's variables, for a child process that must form its own process group."""
    return {k: v for k, v in env.items() if k not in LAUNCHER_VARIABLES and not k.startswith(LAUNCHER_PREFIXES)}


def first_task(env: Mapping[str, str] | None = None) -> bool:
    """Whether this is the launcher's task 0 (or no launcher numbered the tasks): the one that reports."""
    env = os.environ if env is None else env
    ranks = ["RANK", "SLURM_PROCID", *(names[1] for names in MPI)]
    return all(env.get(name, "0") == "0" for name in ranks)


def first_on_node() -> bool:
    """Whether this rank is its node's first (LOCAL_RANK 0, or no local rank set): the one that reports what
    differs between nodes."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("gpu[07-09,12],cpu3" -> "gpu07"), from its syntax: the first item,
    each bracket replaced by its first number (zero padding kept). `scontrol show hostnames` where that syntax is
    not understood."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    host = re.sub(r"\[([0-9]+)[^\]]*\]", r"\1", first)
    if re.fullmatch(r"[\w.\-]+", host):
        return host
    if shutil.which("scontrol"):
        found = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.split():
            return found.stdout.split()[0]
    raise LaunchError(f"SLURM node list {nodelist!r}: cannot tell its first host; set MASTER_ADDR to it")


def tasks_on_this_node(env: Mapping[str, str]) -> int:
    """Tasks of this SLURM step on this node, from SLURM_STEP_TASKS_PER_NODE ("2(x3),1": 2, 2, 2, 1)."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return int(env.get("SLURM_NTASKS_PER_NODE", 1))
    counts = []
    for part in spec.split(","):
        count, _, times = re.fullmatch(r"(\d+)(\(x(\d+)\))?", part).groups()
        counts += [int(count)] * int(times or 1)
    node = int(env.get("SLURM_NODEID", 0))
    return counts[node] if node < len(counts) else counts[0]


def gpu_index(local_rank: int, local_world: int, visible: int) -> int:
    """The GPU of a rank: its local rank, or 0 where the launcher gave each task a GPU of its own (SLURM's
    --gpus-per-task: one visible device). More ranks on a node than GPUs is refused."""
    if visible == 1:
        return 0
    if local_world > visible or local_rank >= visible:
        raise LaunchError(
            f"{local_world} ranks on this node but {visible} GPUs visible: start one rank per GPU (LOCAL_RANK "
            f"{local_rank})"
        )
    return local_rank
