"""The process group: joining it (after pipeline.launch has read the launcher's variables), collectives with a
timeout, and naming the ranks lost when one fails."""

from __future__ import annotations

import datetime
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline import launch
from pipeline.options import at_least


def share_cores() -> None:
    """Give each rank on a host its share of the cores (the deepspeed launcher says LOCAL_SIZE, torchrun
    LOCAL_WORLD_SIZE); without it every rank of a CPU host runs a thread per core and they thrash."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    os.environ["LOCAL_WORLD_SIZE"] = str(local)
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local))


class JoinError(RuntimeError):
    """Not every rank of the job joined the process group in time (a host that did not start its ranks)."""


def init(timeout_s: int = 600, join_timeout_s: int = 300) -> tuple[int, int]:
    """Join the process group (NCCL on GPUs, gloo on CPUs) and pick this rank's GPU; returns (rank, world size).
    Forming the group waits at most `join_timeout_s` for every rank (JoinError after); a collective then waits
    `timeout_s` for a peer (a rank died) and fails instead of hanging forever."""
    import deepspeed

    launcher = launch.adopt().launcher
    share_cores()
    if torch.cuda.is_available():
        local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
        torch.cuda.set_device(launch.gpu_index(local_rank, local_world, torch.cuda.device_count()))
    try:
        deepspeed.init_distributed(
            dist_backend="nccl" if torch.cuda.is_available() else "gloo",
            timeout=datetime.timedelta(seconds=join_timeout_s),
        )
    except RuntimeError as e:  # torch's DistError (a store timeout) among them
        raise JoinError(joined(e, join_timeout_s, launcher)) from e
    apply_timeout(timeout_s)
    return dist.get_rank(), dist.get_world_size()


def apply_timeout(timeout_s: int) -> None:
    """Make every process group formed so far give up on a silent peer after `timeout_s`: the default group, and the
    groups DeepSpeed forms in initialize (its data-parallel group carries the gradient all-reduce), which torch
    gives its own 30-minute default. Call again after those are formed."""
    # torch < 2.10 has only the private name of dist.set_timeout.
    set_timeout = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout
    for group in list(dist.distributed_c10d._world.pg_map):
        set_timeout(datetime.timedelta(seconds=timeout_s), group)


def joined(error: BaseException, join_timeout_s: int, launcher: str = "torch") -> str:
    """The one line for a process group that did not form: how many ranks joined, and the likely cause."""
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    store = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    found = re.search(r"(\d+)/(\d+) clients joined", str(error))
    if found:
        what = f"only {found.group(1)} of {found.group(2)} ranks joined"
    else:
        what = f"rank {rank} of {world} could not join the rendezvous at {store}"
    if launcher == "torch":
        cause = (
            "a host of the hostfile did not start its ranks; check that every host answers `ssh HOST hostname` "
            "from the launching host without a password, and that its slots are free"
        )
    else:
        cause = (
            f"a {launcher} task did not start, or cannot reach rank 0's node at {store}; check that "
            "MASTER_ADDR resolves and is reachable from every node"
        )
    return f"{what} within --join-timeout {join_timeout_s}s: {cause}"


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


def where() -> str:
    """This rank's node as its peers see it: the address it reaches the rendezvous from, and its host name."""
    address = "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            # A datagram socket's connect sends nothing; it picks the route and so the local address.
            s.connect((os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 1))))
            address = s.getsockname()[0]
    except OSError:
        pass
    return f"{address} ({socket.gethostname()})"


def _bounded(work, seconds: float):
    """`work()`'s result, or None when it fails or has not returned within `seconds` (it is left behind, in a
    daemon thread: a socket read on a link that went down can block far longer than any timeout set on it)."""
    result = []

    def run():
        try:
            result.append(work())
        except Exception:  # noqa: BLE001 (any failure means the same to the caller: no answer)
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return result[0] if result else None


class RollCall:
    """Which ranks are still alive, for the line a rank prints when a collective fails.

    Each rank counts heartbeats in the rendezvous store from a thread of its own (a rank stuck in a collective
    still beats). After a failure, `lost()` names the ranks whose count stopped, with their nodes; `leave()` then
    waits until every other survivor has called the roll too, so that no survivor leaves early and looks lost to
    the others, and the store (it lives in rank 0's process) stays up until all have read it. A rank that cannot
    reach the store has lost rank 0's node, or its own link.
    """

    BEAT_S = 0.5
    KEY = "pipeline/rollcall"

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.dead = rank, world, list[int]()
        self.master = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        self.stopped, self.store = threading.Event(), None
        if world == 1:
            return
        try:
            # A client of its own: the default group's client is not shared with a thread.
            self.store = dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                is_master=False,
                timeout=datetime.timedelta(seconds=5),
            )
            self.store.set(f"{self.KEY}/where/{rank}", where())
        except (RuntimeError, KeyError, ValueError):
            # No store at MASTER_ADDR:MASTER_PORT (a launcher whose rendezvous lives elsewhere): no roll call; a
            # failed collective is then reported without naming the lost ranks.
            self.store = None
            return
        threading.Thread(target=self._beat, name="rollcall", daemon=True).start()

    def _beat(self) -> None:
        while not self.stopped.is_set():
            try:
                self.store.add(f"{self.KEY}/beat/{self.rank}", 1)
            except Exception:  # noqa: BLE001 (the store is gone: lost() says so)
                return
            self.stopped.wait(self.BEAT_S)

    def _beats(self) -> list[int]:
        return [self.store.add(f"{self.KEY}/beat/{r}", 0) for r in range(self.world)]

    def _left(self, rank: int) -> bool:
        return self.store.check([f"{self.KEY}/left/{rank}"])

    def lost(self) -> str:
        """What this rank lost, in words ("ranks 2, 3 on 10.0.0.12 (node-b)", or rank 0's node). Takes 5
        heartbeats, or 10 s more when the store does not answer."""
        if self.store is None:
            return "contact with a peer (no roll call in this job: its rendezvous store was out of reach)"
        nodes = _bounded(self._dead_by_node, 5 * self.BEAT_S + 10)
        if nodes is None:
            # A store op on a link that went down blocks in the socket past the store's own timeout.
            self.store = None
            return (
                f"rank 0's node: the rendezvous store in rank 0 at {self.master} does not answer (that node is "
                f"down, or this node's link to it)"
            )
        if not nodes:
            return "contact with a peer, though every rank still answers the roll call"
        return "; ".join(f"rank{'s' * (len(r) > 1)} {', '.join(map(str, r))} on {node}" for node, r in nodes.items())

    def _dead_by_node(self) -> dict[str, list[int]]:
        before = self._beats()
        time.sleep(5 * self.BEAT_S)
        after = self._beats()
        # A rank that already called the roll and left is a survivor, not a lost rank.
        self.dead = [r for r in range(self.world) if after[r] == before[r] and r != self.rank and not self._left(r)]
        nodes: dict[str, list[int]] = {}
        for r in self.dead:
            nodes.setdefault(self.store.get(f"{self.KEY}/where/{r}").decode(), []).append(r)
        return nodes

    def leave(self, wait_s: float) -> None:
        """Say this rank has called the roll, then wait (at most `wait_s`) for the other survivors to say so."""
        if self.store is not None:
            _bounded(lambda: self._leave(time.monotonic() + wait_s), wait_s + 5)

    def _leave(self, deadline: float) -> None:
        self.store.set(f"{self.KEY}/left/{self.rank}", "1")
        while time.monotonic() < deadline:
            if all(self._left(r) for r in range(self.world) if r not in self.dead):
                return
            time.sleep(self.BEAT_S)

    def stop(self) -> None:
        self.stopped.set()


def close() -> None:
    """Leave the process group."""
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class ClusterOptions:
    """How the ranks wait for each other."""

    # Seconds a rank waits in a collective for its peers before giving up (a dead rank ends the others).
    dist_timeout: int = 600
    # Seconds the ranks wait for each other when the job starts (a host of the hostfile that never starts its
    # ranks ends the job after this, with one line).
    join_timeout: int = 300

    def __post_init__(self):
        at_least(self, ("dist_timeout", "join_timeout"), 1)
