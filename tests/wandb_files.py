"""What wandb wrote in offline mode: the records of a run's `.wandb` file (a W&B header, then a LevelDB-style log of
32 KiB blocks of records, each a 7-byte header (CRC-32, length, type) and a chunk of a protobuf `Record`)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7

FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    """Every record of a .wandb file, in order (wandb_internal_pb2.Record)."""
    # Imported here: the GPU image has no wandb, and the gpu tests use these helpers too.
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, chunks, out = HEADER, b"", []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the rest of a block too short for a header is padding
            pos += left
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        chunks += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            out.append(record)
            chunks = b""
    return out


def run_file(out_dir: Path) -> Path:
    """The one offline run file under a run folder."""
    (found,) = out_dir.glob("wandb/offline-run-*/run-*.wandb")
    return found


def logged(out_dir: Path) -> dict:
    """{"run": {project, name, group, tags, job_type}, "config": {...}, "history": [{key: value}], "summary": {...}}
    of the one run under `out_dir` (its wandb/ folder)."""
    config, history, summary, run = {}, [], {}, {}
    for r in records(run_file(out_dir)):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = {"project": r.run.project, "name": r.run.display_name, "group": r.run.run_group,
                   "tags": list(r.run.tags), "job_type": r.run.job_type, "id": r.run.run_id}  # fmt: skip
        if kind in ("config", "run"):
            updates = r.config.update if kind == "config" else r.run.config.update
            config.update({i.key: json.loads(i.value_json) for i in updates})
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
    return {"run": run, "config": config, "history": history, "summary": summary}
