"""make lint, in the suite: ruff's checks pass, its formatter owns the layout, and no library code keeps a line
from it (# fmt: skip or # fmt: off)."""

import sys
from pathlib import Path

from tests import procs
from tests.runs import ROOT

RUFF = str(Path(sys.executable).parent / "ruff")


def test_ruff_checks_and_formats_everything():
    for args in (["check", "."], ["format", "--check", "."]):
        proc = procs.run([RUFF, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 0, f"ruff {' '.join(args)}:\n{proc.stdout}{proc.stderr}"


def test_no_library_code_keeps_a_line_from_the_formatter():
    kept = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("pipeline", "data_prep", "bench")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "# fmt: skip" in line or "# fmt: off" in line
    ]
    assert kept == []
