"""Crash-safe files: publish all at once (write, flush, fsync, rename), so a reader or a resumed run sees the old
file or the whole new one, never half of one."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make renames inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partial_name(path: Path) -> Path:
    """The temporary name a file is written under before it is published (unique per process)."""
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def write_atomic(path: Path, data: bytes | str) -> None:
    """Publish `data` at `path` all at once: readers see the old file or the whole new one."""
    tmp = partial_name(path)
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def remove_partials(folder: Path) -> None:
    """Delete temporary files an interrupted run left behind."""
    for tmp in folder.glob(".*.partial"):
        tmp.unlink(missing_ok=True)
