"""The tests' own process hygiene: nothing a test starts outlives it (tests/procs.py)."""

import os
import subprocess
import sys
import time

import pytest

from tests import procs


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def test_a_timed_out_command_ends_with_what_it_started():
    with pytest.raises(subprocess.TimeoutExpired) as timed_out:
        procs.run(["bash", "-c", "sleep 300 & echo $!; wait"], timeout=1, capture_output=True, text=True)
    child = int(timed_out.value.stdout.split()[0])
    assert wait_gone(child), f"the command's background child {child} outlived its timeout"


def test_a_process_that_leaves_its_group_still_ends_with_its_test():
    # As torchrun does with its workers: a grandchild in a session of its own, out of the group's reach.
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen(['sleep', '300'], start_new_session=True); print(p.pid, flush=True); time.sleep(300)"
    )
    parent = procs.start([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    escaped = int(parent.stdout.readline())
    assert os.getpgid(escaped) != os.getpgid(parent.pid)
    assert escaped in procs.marked()
    left = procs.end_all()
    # The group went first; what escaped it was found by its mark.
    assert left == [escaped]
    assert wait_gone(escaped)
    assert wait_gone(parent.pid)
    assert procs.marked() == []
