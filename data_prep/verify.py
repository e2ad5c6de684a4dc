"""Re-read every shard of a TFRecord directory (ours or third-party) and report any damage.

    python -m data_prep.verify DIR [--full] [--workers N]

Checks every record's framing and both CRCs, that each record is a tf.train.Example with an image
and a label, the DALI index files, and, where DIR has a manifest.json, the shard set, per-shard
record counts, sizes and sha256, and the label range. --full also decodes every image in full.
Each problem is one line naming the shard and byte offset; any problem means exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from multiprocessing import get_context
from pathlib import Path

from pipeline.format import manifest as manifests
from pipeline.format.check import ShardReport, check_shard
from pipeline.format.layout import find_shards, missing_shards


def _against_manifest(folder: Path, manifest: manifests.Manifest, reports: dict[str, ShardReport]) -> list[str]:
    """Problems where the shards differ from what manifest.json recorded."""
    problems = []
    listed = {s.file: s for s in manifest.all_shards()}
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
            if getattr(got, key) != getattr(want, key):
                recorded = getattr(want, key)
                problems.append(f"{folder / name}: {key} is {getattr(got, key)}, manifest.json says {recorded}")
        if not got.has_index:
            problems.append(f"{folder / name}.idx: missing; DALI needs it (rebuild with tfrecord2idx)")
        bad = sorted(x for x in got.labels if not manifest.label_base <= x <= manifest.label_max)
        if bad:
            problems.append(f"{folder / name}: label {bad[0]} outside {manifest.label_base}..{manifest.label_max}")
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
    try:
        manifest = manifests.load(root)
    except manifests.ManifestError as e:
        return problems + [str(e)], reports
    if manifest is not None:
        problems += _against_manifest(root, manifest, reports)
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
