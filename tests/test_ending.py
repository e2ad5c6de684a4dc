"""How our processes end: ending.end_process skips the interpreter's teardown, not what the process wrote."""

import os
import subprocess
import sys

from tests import procs
from tests.runs import ROOT

CHILD = """
import logging, sys
from pipeline import ending
logging.basicConfig(filename=sys.argv[1], level=logging.INFO)
logging.info("logged")
print("printed", end="")
print("said", end="", file=sys.stderr)
ending.end_process(3)
print("not reached")
"""


def test_a_process_ends_with_its_status_and_everything_it_wrote(tmp_path):
    """Into pipes (block-buffered, as under a launcher) and a log file, nothing flushed by hand."""
    log = tmp_path / "child.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = procs.run([sys.executable, "-c", CHILD, str(log)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     text=True, cwd=ROOT, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 3
    assert proc.stdout == "printed"
    assert proc.stderr.endswith("said")
    assert log.read_text() == "INFO:root:logged\n"
