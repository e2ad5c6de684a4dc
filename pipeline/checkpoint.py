"""DeepSpeed checkpoints that are only trusted once every rank has finished writing them.

Layout: `<out_dir>/checkpoints/step00001234/` holds DeepSpeed's files plus `complete.json`, which
rank 0 writes after a barrier. A folder without it (a crash mid-save) is never resumed from and
never counts towards the checkpoints kept.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist

from data_prep.journal import write_atomic

COMPLETE = "complete.json"


def tag(step: int) -> str:
    """The folder name of the checkpoint taken after `step` optimizer steps."""
    return f"step{step:08d}"


def complete(folder: Path) -> list[Path]:
    """Complete checkpoints under `folder`, oldest first."""
    found = [p for p in folder.glob("step*") if (p / COMPLETE).is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda p: json.loads((p / COMPLETE).read_text())["step"])


def save(engine, folder: Path, state: dict, keep: int) -> Path:
    """Save on every rank (a collective), mark complete on rank 0, then drop the oldest beyond `keep`."""
    path = folder / tag(engine.global_steps)
    if dist.get_rank() == 0 and (path / COMPLETE).is_file():
        # Saving this step again (an epoch end that --save-every-steps also hit): it is incomplete until rewritten.
        (path / COMPLETE).unlink()
    dist.barrier()
    engine.save_checkpoint(str(folder), tag=path.name, client_state=state)
    dist.barrier()
    if dist.get_rank() == 0:
        write_atomic(path / COMPLETE, json.dumps({"step": engine.global_steps, **state}).encode())
        for old in complete(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        print(f"saved checkpoint {path} at step {engine.global_steps}", flush=True)
    dist.barrier()
    return path


def find(resume: str, folder: Path) -> Path | None:
    """The checkpoint `--resume` names: `auto` is the newest complete one (None if there is none yet)."""
    if resume == "auto":
        found = complete(folder)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise ValueError(
            f"--resume {resume}: not a complete checkpoint (no {COMPLETE}); use --resume auto or one of "
            f"{[str(p) for p in complete(path.parent)] or 'the step* folders under <out_dir>/checkpoints'}"
        )
    return path


def load(engine, path: Path) -> dict:
    """Restore weights, optimizer, loss scaler, scheduler and step counters; returns the saved client state."""
    loaded, state = engine.load_checkpoint(str(path.parent), tag=path.name)
    if loaded is None:
        raise ValueError(f"--resume {path}: DeepSpeed could not load it; use another checkpoint or start afresh")
    if dist.get_rank() == 0:
        print(f"resumed from {path} at step {engine.global_steps}", flush=True)
    return state
