"""Re-read every shard of a TFRecord directory (ours or third-party) and report any damage.

    python -m data_prep.verify DIR [--full] [--workers N]

Checks every record's framing and both CRCs, that each record is a tf.train.Example with an image
and a label, the DALI index files, and, where DIR has a manifest.json, the shard set, per-shard
record counts, sizes and sha256, and the label range. --full also decodes every image in full.
Each problem is one line naming the shard and byte offset; any problem means exit status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from google.protobuf.message import DecodeError

from data_prep import example, images, tfrecord

SHARD_NAME = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})$")


@dataclass
class ShardReport:
    """What re-reading one shard found."""

    path: str
    records: int = 0
    bytes: int = 0
    sha256: str = ""
    labels: set = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    has_index: bool = True


def find_shards(folder: Path) -> list[Path]:
    """Shard files named like `train-00000-of-01024` in a folder, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and SHARD_NAME.match(p.name))


def missing_shards(shards: list[Path]) -> list[str]:
    """Names absent from a `prefix-i-of-n` series (a lost shard means lost images)."""
    seen: dict[tuple[str, int], set[int]] = {}
    for p in shards:
        m = SHARD_NAME.match(p.name)
        seen.setdefault((m["prefix"], int(m["count"])), set()).add(int(m["index"]))
    return [
        f"{prefix}-{i:05d}-of-{count:05d}"
        for (prefix, count), found in sorted(seen.items())
        for i in range(count)
        if i not in found
    ]


def _check_example(data: bytes, offset: int, name: str, full: bool, report: ShardReport) -> None:
    """Parse one record's Example; with `full`, decode its image and compare the stored size."""
    try:
        features = example.decode(data)
    except DecodeError:
        report.problems.append(f"{name}: record at offset {offset}: payload is not a tf.train.Example")
        return
    encoded, label = features.get(example.ENCODED), features.get(example.LABEL)
    if not encoded or not label:
        report.problems.append(f"{name}: record at offset {offset}: Example lacks {example.ENCODED} or {example.LABEL}")
        return
    report.labels.add(label[0])
    if not full:
        return
    verdict = images.check(encoded[0])
    recorded = (features.get(example.WIDTH, [None])[0], features.get(example.HEIGHT, [None])[0])
    if verdict.action == images.SKIP:
        report.problems.append(f"{name}: record at offset {offset}: image does not decode ({verdict.reason})")
    elif None not in recorded and recorded != (verdict.width, verdict.height):
        report.problems.append(
            f"{name}: record at offset {offset}: image is {verdict.width}x{verdict.height}, "
            f"record says {recorded[0]}x{recorded[1]}"
        )


def _check_index(path: Path, expected: str, report: ShardReport) -> None:
    """Compare a shard's .idx with the index its records imply, naming the first wrong entry."""
    index = path.with_name(path.name + ".idx")
    if not index.is_file():
        report.has_index = False
        return
    got, want = index.read_text().splitlines(), expected.splitlines()
    wrong = next((i for i, (g, w) in enumerate(zip(got, want, strict=False)) if g != w), None)
    if wrong is not None:
        report.problems.append(
            f"{index}: line {wrong + 1} is {got[wrong]!r} but the record at offset {want[wrong].split()[0]} "
            f"needs {want[wrong]!r}; rebuild it with tfrecord2idx"
        )
    elif len(got) != len(want):
        report.problems.append(f"{index}: {len(got)} entries for {len(want)} records; rebuild it with tfrecord2idx")


class _HashingReader:
    """A file wrapper that hashes every byte read through it, so a shard is read only once."""

    def __init__(self, f):
        self.f, self.digest = f, hashlib.sha256()

    def read(self, size: int) -> bytes:
        data = self.f.read(size)
        self.digest.update(data)
        return data


def check_shard(task: tuple[str, bool]) -> ShardReport:
    """Re-read one shard: framing and CRCs, Examples, index; with `full`, every image."""
    path, full = Path(task[0]), task[1]
    report = ShardReport(str(path))
    lines = []
    with open(path, "rb") as f:
        reader = _HashingReader(f)
        try:
            for record in tfrecord.read_records(reader, str(path)):
                _check_example(record.data, record.offset, str(path), full, report)
                lines.append(tfrecord.index_line(record.offset, record.size))
                report.records += 1
        except tfrecord.RecordError as e:
            report.problems.append(str(e))
            return report
        report.bytes = f.tell()
    report.sha256 = reader.digest.hexdigest()
    _check_index(path, "".join(lines), report)
    return report


def _against_manifest(folder: Path, manifest: dict, reports: dict[str, ShardReport]) -> list[str]:
    """Problems where the shards differ from what manifest.json recorded."""
    problems = []
    label_max = manifest["label_base"] + manifest["num_classes"] - 1
    listed = {s["file"]: s for split in manifest["splits"].values() for s in split["shards"]}
    for name in sorted(set(reports) - set(listed)):
        problems.append(f"{folder / name}: shard not listed in manifest.json")
    for name, want in sorted(listed.items()):
        got = reports.get(name)
        if got is None:
            problems.append(f"{folder / name}: listed in manifest.json but missing")
            continue
        if not got.sha256:  # unreadable past a damaged record: already reported
            continue
        for key in ("records", "bytes", "sha256"):
            if getattr(got, key) != want[key]:
                problems.append(f"{folder / name}: {key} is {getattr(got, key)}, manifest.json says {want[key]}")
        if not got.has_index:
            problems.append(f"{folder / name}.idx: missing; DALI needs it (rebuild with tfrecord2idx)")
        bad = sorted(x for x in got.labels if not manifest["label_base"] <= x <= label_max)
        if bad:
            problems.append(f"{folder / name}: label {bad[0]} outside {manifest['label_base']}..{label_max}")
    return problems


def verify(folder: str, full: bool = False, workers: int = 1) -> tuple[list[str], dict[str, ShardReport]]:
    """All problems found in a shard directory (empty when it is sound), and the per-shard reports."""
    root = Path(folder)
    if not root.is_dir():
        return [f"{folder}: no such directory"], {}
    shards = find_shards(root)
    if not shards:
        return [f"{folder}: no shards named like train-00000-of-01024"], {}
    tasks = [(str(p), full) for p in shards]
    if workers > 1:
        with get_context("spawn").Pool(workers) as pool:
            results = pool.map(check_shard, tasks, chunksize=1)
    else:
        results = [check_shard(t) for t in tasks]
    reports = {Path(r.path).name: r for r in results}
    problems = [f"{root / name}: missing from the series" for name in missing_shards(shards)]
    problems += [p for r in results for p in r.problems]
    if (root / "manifest.json").is_file():
        problems += _against_manifest(root, json.loads((root / "manifest.json").read_text()), reports)
    return problems, reports


def main(argv: list[str] | None = None) -> int:
    """Entry point: print each problem on one line; exit 1 if there is any."""
    p = argparse.ArgumentParser(prog="python -m data_prep.verify", description=__doc__.split("\n")[0])
    p.add_argument("dir", help="folder of TFRecord shards")
    p.add_argument("--full", action="store_true", help="also decode every image in full")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes (default: all cores)")
    args = p.parse_args(argv)
    problems, reports = verify(args.dir, args.full, max(1, args.workers))
    for line in problems:
        print(line)
    records = sum(r.records for r in reports.values())
    no_index = sum(1 for r in reports.values() if not r.has_index)
    if no_index:
        print(f"note: {no_index} shard(s) have no .idx file; the training pipeline builds missing indexes")
    what = "records and images decoded" if args.full else "records"
    verdict = f"{len(problems)} problem(s)" if problems else "OK"
    print(f"{args.dir}: {len(reports)} shards, {records:,} {what}: {verdict}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
