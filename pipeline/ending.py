"""How a rank says that its job ended under it, in one line per node (and in metrics.jsonl on rank 0), with the
checkpoint to resume from: the launcher or the scheduler stopped it (SIGTERM), or ranks went away from a
collective (the roll call names them). And how a process of ours ends once its work is done (end_process)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from pipeline import checkpoint, distributed, launch
from pipeline.tracking import Sinks


def last(checkpoints: Path) -> str:
    """The newest complete checkpoint's name, or none."""
    found = checkpoint.complete(checkpoints)
    return found[-1].name if found else "none"


class FaultLine:
    """The one line a rank says when its job ends under it: the first to call `say` (the training path, or the
    SIGTERM watcher in a thread of its own) writes it to the sinks and, on a node's first rank, to stderr; later
    calls say nothing."""

    def __init__(self, sinks: Sinks):
        self.sinks, self.lock, self.said = sinks, threading.Lock(), False

    def say(self, line: str) -> bool:
        """Say `line` unless a line was said already; returns whether it was."""
        with self.lock:
            if self.said:
                return False
            self.said = True
        self.sinks.summary({"fault": line})
        if launch.first_on_node():
            print(line, file=sys.stderr, flush=True)
        return True


def stop_on_signal(fault: FaultLine, rank: int, world: int, checkpoints: Path, step: Callable[[], int]) -> None:
    """When the launcher or the scheduler stops this rank (SIGTERM: mpirun ending the job after it lost a node,
    scancel, a SLURM time limit), say so in one line per node and in metrics.jsonl (rank 0), with the checkpoint
    to resume from, before the SIGKILL that follows (1 s later under mpirun, whose own ending may cut the line off
    its output). Unless the rank had said its fault already: mpirun's SIGTERM usually comes while the rank calls
    the roll of the lost ranks (lost_ranks), so it says this line instead of that one.

    The line comes from a thread of its own: the main thread may be blocked in a collective that waits on a rank
    that is being stopped too, where Python's signal handlers never run. Python's own handler writes the signal's
    number to the wakeup socket (signal.set_wakeup_fd) whichever thread the signal interrupts."""
    receive, send = socket.socketpair()
    send.setblocking(False)
    signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
    # A handler of our own, so that SIGTERM does not end the process before the watcher has spoken.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)

    def watch(wakeup=send) -> None:
        # `wakeup` keeps the sending end open for as long as the watcher runs (its fd is Python's wakeup fd).
        while receive.recv(1) != bytes([signal.SIGTERM]):
            pass
        fault.say(
            f"error: rank {rank} of {world} on {distributed.where()}: stopped by the launcher (SIGTERM) at step "
            f"{step()}; the job is over: rerun with --resume auto (last complete checkpoint: {last(checkpoints)})"
        )
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="sigterm", daemon=True).start()


def lost_ranks(
    fault: FaultLine,
    sinks: Sinks,
    roll: distributed.RollCall,
    checkpoints: Path,
    step: int,
    dist_timeout: float,
) -> str:
    """A collective failed because ranks went away: one line per node (its first rank) naming the ranks and nodes
    lost (the roll call), then every survivor leaves together; returns the line. No close: the group is broken."""
    line = (
        f"rank {roll.rank} of {roll.world} on {distributed.where()}: a collective failed at step {step}: lost "
        f"{roll.lost()}; the job is over: when every node is back, rerun with --resume auto (last complete "
        f"checkpoint: {last(checkpoints)})"
    )
    # Said now, before the wait: a launcher may end the survivors once one of them has left.
    fault.say(f"error: {line}")
    sinks.close()
    wait = dist_timeout + 10
    if roll.store is None and not launch.first_on_node():
        # No store to wait on: leave the line to this node's first rank (the launcher ends this one when it exits).
        time.sleep(wait)
    roll.leave(wait)
    roll.stop()
    return line


def end_process(status: int) -> NoReturn:
    """End the process with `status` without the interpreter's teardown, once what it wrote is out. The entry points
    call it after their work is closed: files are written whole (each write opens and closes its file), wandb and
    the process group are finished. The teardown would only free memory, at a cost of 1 to 2 s per process on a
    small CPU: a final garbage collection over torch's, DeepSpeed's and timm's modules, and CUDA libraries
    unregistering kernels they never ran (their pages read from disk on a machine without a GPU)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
