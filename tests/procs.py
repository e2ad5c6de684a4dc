"""The tests' subprocesses: each starts in a process group of its own and is ended, with everything it started,
when its test ends, whether the test passed, failed or timed out (conftest's autouse fixture calls `end_all`).

A process that leaves its group (torchrun starts its workers in sessions of their own) is still found: every
process a test starts carries MARK in its environment, and so do the ranks DeepSpeed's launcher starts on the test
hosts (tests/hosts.py passes it in the launcher's env file).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

# Environment variable every test subprocess (and what it starts) carries: this pytest process's id.
MARK = "IMAGENET_PIPELINE_TEST"
TOKEN = str(os.getpid())
# A subprocess's own time limit: under pytest's (pyproject: timeout = 600), so that its output is reported.
TIMEOUT = 540

_groups: set[int] = set()


def _env(env: dict | None) -> dict:
    return {**(os.environ if env is None else env), MARK: TOKEN}


def start(command: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
    """subprocess.Popen in a new process group, ended with its test."""
    proc = subprocess.Popen(command, env=_env(env), start_new_session=True, **kwargs)
    _groups.add(proc.pid)
    return proc


def run(
    command: list[str],
    *,
    timeout: float = TIMEOUT,
    check: bool = False,
    capture_output: bool = False,
    input: str | None = None,
    **kwargs,
) -> subprocess.CompletedProcess:
    """subprocess.run in a new process group; on a timeout the whole group is killed before TimeoutExpired."""
    if capture_output:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    proc = start(command, **kwargs)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        end(proc)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(command, timeout, out, err) from None
    finally:
        # What the command left behind (a daemon, a worker in its group) goes with it.
        end(proc)
    done = subprocess.CompletedProcess(command, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done


def end(proc: subprocess.Popen) -> None:
    """Kill a started process's whole group."""
    _kill_group(proc.pid)
    _groups.discard(proc.pid)
    if proc.poll() is None:
        proc.wait()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def marked() -> list[int]:
    """Processes alive that carry this test session's MARK (zombies excluded)."""
    needle = f"{MARK}={TOKEN}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


def end_all(wait: float = 10.0) -> list[int]:
    """Kill every group this test started and every marked process; returns the ones that were still alive."""
    for pgid in list(_groups):
        _kill_group(pgid)
    _groups.clear()
    left = marked()
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait
    while marked() and time.monotonic() < deadline:
        time.sleep(0.05)
    return left
