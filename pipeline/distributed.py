"""Process-group set-up for the three ways a run starts: the deepspeed launcher, torchrun, or plain python."""

from __future__ import annotations

import datetime
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port nothing listens on now, for a one-process rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What launchers set for a process to join their group.
LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "LOCAL_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def without_launcher(env: dict[str, str]) -> dict[str, str]:
    """`env` without the launcher variables, for a child process that must form its own process group."""
    return {k: v for k, v in env.items() if k not in LAUNCHER_VARIABLES}


def single_process_env() -> None:
    """Plain `python pipeline/train.py`: set the rendezvous variables a launcher would (else DeepSpeed tries MPI)."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def share_cores() -> None:
    """Give each rank on a host its share of the cores (the deepspeed launcher says LOCAL_SIZE, torchrun
    LOCAL_WORLD_SIZE); without it every rank of a CPU host runs a thread per core and they thrash."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    os.environ["LOCAL_WORLD_SIZE"] = str(local)
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local))


def init(timeout_s: int = 600) -> tuple[int, int]:
    """Join the process group (NCCL on GPUs, gloo on CPUs) and pick this rank's GPU; returns (rank, world size).
    A collective that waits `timeout_s` for a peer (a rank died) fails instead of hanging forever."""
    import deepspeed

    single_process_env()
    share_cores()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(
        dist_backend="nccl" if torch.cuda.is_available() else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
    )
    return dist.get_rank(), dist.get_world_size()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums over all ranks (float64, so counts stay exact). Note: a host-device sync point."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@contextmanager
def rank0_buffers(module: torch.nn.Module) -> Iterator[None]:
    """Rank 0's buffers (batch-norm statistics) on every rank while inside, each rank's own restored after. The
    statistics are per rank (Goyal et al.), so without this each rank would validate a different model; with it
    every rank validates the model rank 0's checkpoint saves. A collective: every rank enters it."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        yield
        return
    buffers = list(module.buffers())
    own = [b.detach().clone() for b in buffers]
    for b in buffers:
        dist.broadcast(b.data, src=0)
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in zip(buffers, own, strict=True):
                b.copy_(saved)


def lost_peer(error: BaseException) -> tuple[str, str] | None:
    """(where, why) of a collective that failed because peers went away ("10.0.0.12", "Connection reset by peer"),
    or None when `error` is not such a failure (gloo's transport errors and timeouts, NCCL's, torch's DistError)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if not (isinstance(error, dist.DistError) or "gloo/transport" in text or "NCCL" in text):
        return None
    found = re.search(r"\[([0-9a-fA-F.:]+)\]:\d+", text)
    # "[gloo/transport/tcp/pair.cc:545] Read error [10.0.0.12]:57509: Connection reset by peer. This is ..."
    why = re.sub(r"\s*\[[0-9a-fA-F.:]+\]:\d+", "", re.sub(r"^\[[^\]]*\]\s*", "", text)).split(". ")[0]
    return (found.group(1) if found else "a peer"), why


def close() -> None:
    """Leave the process group."""
    if dist.is_initialized():
        dist.destroy_process_group()
