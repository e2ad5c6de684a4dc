"""An append-only JSON-lines journal of finished work (atomic publishing is pipeline.format.atomic).

A journal line is appended and fsynced only after the work it records is published, so after a
kill -9 the journal never claims unfinished work; a torn last line is dropped on reopen.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.format.atomic import write_atomic


class Journal:
    """Append-only JSON-lines log of finished work, safe against a crash mid-append."""

    def __init__(self, path: Path):
        self.path = path
        self.entries = self._read_complete_lines()
        # Rewrite without a torn tail, so appends never glue onto half a line.
        write_atomic(path, "".join(json.dumps(e, sort_keys=True) + "\n" for e in self.entries))

    def _read_complete_lines(self) -> list[dict]:
        """Entries of every complete, parseable line (a torn last line is dropped)."""
        if not self.path.exists():
            return []
        entries = []
        for line in self.path.read_text().splitlines(keepends=True):
            if not line.endswith("\n"):
                break
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return entries

    def append(self, entry: dict) -> None:
        """Record one finished piece of work durably."""
        with open(self.path, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries.append(entry)
