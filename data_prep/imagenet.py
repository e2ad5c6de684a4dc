"""Turn raw ImageNet (extracted folders, or the downloads read in place) into verified, class-mixed, DALI-ready
TFRecord shards.

    python -m data_prep.imagenet --src SRC --out OUT [--train-shards 1024] [--val-shards 128]
        [--workers N] [--resize-shorter PX] [--seed S] [--val-labels FILE]

SRC holds train/ and val/, or image-net.org's ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and
ILSVRC2012_devkit_t12.tar.gz, or Kaggle's imagenet-object-localization-challenge.zip (data_prep.source).
Archives are indexed once under OUT/.prep/index; the images are then read by offset, never extracted.
Two passes, both parallel and both journaled under OUT/.prep so that a killed run resumes:
  1. check: every image is decoded in full, in the order the source holds them; bad files are skipped (and
     listed), CMYK/YCCK JPEGs, PNGs and images with alpha are marked for re-encoding as RGB JPEG;
  2. write: the usable images, in a seeded shuffle, are cut into shards whose sizes differ by at
     most one record; each shard and its DALI index are published atomically.
OUT then holds `train-00000-of-01024`..., `validation-00000-of-00128`..., a `.idx` beside each,
`labels.txt` (wnid per line, line n = label n, 1-based) and `manifest.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from data_prep import images
from data_prep.archives import ArchiveError
from data_prep.journal import Journal
from data_prep.source import Reader, Source, SourceError, SourceFile, scan
from pipeline.format import example, tfrecord
from pipeline.format import manifest as manifests
from pipeline.format.atomic import fsync_dir, partial_name, remove_partials, write_atomic
from pipeline.format.layout import LABELS, MANIFEST, SPLITS, index_path, shard_name

# Files per unit of work in the check pass; fixed so that a resumed run can reuse finished chunks.
CHECK_CHUNK = 256
STATE_DIR = ".prep"
# The check pass's journal under STATE_DIR: one line per chunk of the files in the order they lie.
CHECKS_JOURNAL = "checks.jsonl"
# The write pass reads each shard's images in the order they lie on disk, up to this many bytes at a time, and
# writes them in the shuffled order: a forward sweep instead of random reads (spinning disks, network filesystems).
READ_GROUP_BYTES = 256 << 20


class PrepError(ValueError):
    """Preparation cannot go on; the message names the file or value and the fix."""


@dataclass(frozen=True)
class Settings:
    """Everything that determines the output bytes; a resumed run must match it exactly."""

    source: str
    val_labels: str
    train_shards: int
    val_shards: int
    resize_shorter: int | None
    seed: int
    # sha256 of the sorted (path, wnid) list of every split: a changed source cannot resume.
    files_sha256: str


class FileCheck(NamedTuple):
    """What the check pass found for one source file (journaled as a JSON list)."""

    action: str
    reason: str
    height: int
    width: int
    channels: int
    # Source file size, to notice a file that changes between the two passes.
    size: int


@dataclass(frozen=True)
class Item:
    """One image as it goes into a shard: where it comes from, its label, and what the check found."""

    file: SourceFile
    label: int
    check: FileCheck


def shuffled(files: list[SourceFile], seed: int, split: str) -> list[SourceFile]:
    """The split in a seeded random order (string seeds hash the same on every Python 3)."""
    order = list(files)
    random.Random(f"{seed}:{split}").shuffle(order)
    return order


def balanced_slices(count: int, parts: int) -> list[slice]:
    """`parts` contiguous slices of range(count) whose lengths differ by at most one."""
    return [slice(i * count // parts, (i + 1) * count // parts) for i in range(parts)]


def _files_digest(source: Source) -> str:
    """A fingerprint of the source file list and its labels."""
    h = hashlib.sha256()
    for split in SPLITS:
        for f in source.files[split]:
            h.update(f"{split}\t{f.path}\t{f.wnid}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------- pass 1: check


def check_chunk(task: tuple[str, list[SourceFile], int | None]) -> list[FileCheck]:
    """Decode every file of a chunk in full and say what to do with each."""
    root, files, resize_shorter = task
    results = []
    with Reader(root) as reader:
        for f in files:
            try:
                data = reader.read(f)
            except OSError as e:
                results.append(FileCheck(images.SKIP, f"unreadable: {e.strerror}", 0, 0, 0, 0))
                continue
            c = images.check(data, resize_shorter)
            results.append(FileCheck(c.action, c.reason, c.height, c.width, c.channels, len(data)))
    return results


def _check_split(split, files, order, settings, journal, run_map) -> list[FileCheck]:
    """Check results for every file of `order`, reusing chunks an earlier run journaled. The chunks follow where
    the files lie (an archive's offsets, a folder's paths), so each worker reads a run of neighbours, not scattered
    images."""
    in_place = sorted(files, key=lambda f: f.place)
    chunks = [in_place[i : i + CHECK_CHUNK] for i in range(0, len(in_place), CHECK_CHUNK)]
    done = {e["chunk"]: [FileCheck(*r) for r in e["results"]] for e in journal.entries if e["split"] == split}
    todo = [i for i in range(len(chunks)) if i not in done]
    tasks = [(settings.source, chunks[i], settings.resize_shorter) for i in todo]
    with _progress(len(in_place), f"check {split}", sum(len(r) for r in done.values())) as bar:
        for i, results in zip(todo, run_map(check_chunk, tasks), strict=True):
            journal.append({"split": split, "chunk": i, "results": results})
            done[i] = results
            bar.update(len(results))
    found = {f.path: r for i, chunk in enumerate(chunks) for f, r in zip(chunk, done[i], strict=True)}
    return [found[f.path] for f in order]


# ---------------------------------------------------------------- pass 2: write


def write_shard(task: tuple[str, str, str, list[Item], int | None]) -> dict:
    """Write one shard and its DALI index under temporary names, then publish both atomically."""
    root, out, name, items, resize_shorter = task
    shard, index = Path(out, name), index_path(Path(out, name))
    digest, offset, lines = hashlib.sha256(), 0, []
    with open(partial_name(shard), "wb") as f, Reader(root) as reader:
        for item, data in _in_disk_order_groups(reader, items):
            record = tfrecord.frame(_item_example(item, data, resize_shorter))
            f.write(record)
            digest.update(record)
            lines.append(tfrecord.index_line(offset, len(record)))
            offset += len(record)
        f.flush()
        os.fsync(f.fileno())
    write_atomic(index, "".join(lines))
    os.replace(partial_name(shard), shard)
    fsync_dir(shard.parent)
    return {"file": name, "index": index.name, "records": len(items), "bytes": offset, "sha256": digest.hexdigest()}


def _in_disk_order_groups(reader: Reader, items: list[Item]) -> Iterator[tuple[Item, bytes]]:
    """Each item with its bytes, in the given order, read in groups of READ_GROUP_BYTES sorted by where they lie."""
    group, size = [], 0
    for item in items:
        group.append(item)
        size += item.check.size
        if size >= READ_GROUP_BYTES:
            yield from _read_group(reader, group)
            group, size = [], 0
    yield from _read_group(reader, group)


def _read_group(reader: Reader, group: list[Item]) -> list[tuple[Item, bytes]]:
    """The group's items with their bytes, read in disk order, returned in the group's order."""
    data = {i: reader.read(group[i].file) for i in sorted(range(len(group)), key=lambda i: group[i].file.place)}
    return [(item, data[i]) for i, item in enumerate(group)]


def _item_example(item: Item, data: bytes, resize_shorter: int | None) -> bytes:
    """The serialised Example for one image: its original bytes, or its RGB re-encoding."""
    check, name = item.check, Path(item.file.path).name
    if len(data) != check.size:
        raise PrepError(f"{item.file.path}: changed during preparation ({check.size} -> {len(data)} bytes); run again")
    if check.action == images.REENCODE:
        data = images.reencode(data, resize_shorter)
    colorspace = "RGB" if check.channels == 3 else "Grayscale"
    return example.image_example(
        data, item.label, item.file.wnid, name, check.height, check.width, check.channels, colorspace
    )


def _require_enough(split: str, count: int, shards: int, kind: str = "") -> None:
    """Refuse more shards than images: an empty shard would be a silent hole in the series."""
    if count < shards:
        flag = "--train-shards" if split == "train" else "--val-shards"
        raise PrepError(f"{split}: {count} {kind}images cannot fill {flag} {shards}; lower it")


def _plan_shards(split: str, order, results, source: Source, count: int) -> list[tuple[str, list[Item]]]:
    """Cut the usable images of a split, in shuffled order, into `count` balanced shards."""
    label = {w: i + 1 for i, w in enumerate(source.wnids)}
    items = [Item(f, label[f.wnid], r) for f, r in zip(order, results, strict=True) if r.action != images.SKIP]
    _require_enough(split, len(items), count, "usable ")
    return [(shard_name(split, i, count), items[s]) for i, s in enumerate(balanced_slices(len(items), count))]


def _intact(out: Path, record: dict) -> bool:
    """True when a journaled shard and its index are still in place with the recorded size."""
    shard = out / record["file"]
    return shard.is_file() and shard.stat().st_size == record["bytes"] and (out / record["index"]).is_file()


def _write_split(split, plan, out: Path, settings: Settings, journal: Journal, run_map) -> list[dict]:
    """Write every shard of a plan that is not already published, returning all shard records."""
    done = {e["file"]: e for e in journal.entries if _intact(out, e)}
    todo = [(name, items) for name, items in plan if name not in done]
    tasks = [(settings.source, str(out), name, items, settings.resize_shorter) for name, items in todo]
    total = sum(len(items) for _, items in plan)
    with _progress(total, f"write {split}", total - sum(len(items) for _, items in todo)) as bar:
        for record in run_map(write_shard, tasks):
            journal.append(record)
            done[record["file"]] = record
            bar.update(record["records"])
    return [done[name] for name, _ in plan]


# ---------------------------------------------------------------- orchestration


@contextmanager
def _progress(total: int, desc: str, initial: int = 0) -> Iterator[tqdm]:
    """A progress bar in images with images/s, on stderr."""
    with tqdm(total=total, initial=initial, desc=desc, unit="img", mininterval=1.0, file=sys.stderr) as bar:
        yield bar


@contextmanager
def _mapper(workers: int) -> Iterator[Callable[[Callable, Iterable], Iterator]]:
    """An ordered map over tasks: in this process for one worker, else over a process pool."""
    if workers == 1:
        yield map
        return
    with get_context("spawn").Pool(workers) as pool:
        yield lambda fn, tasks: pool.imap(fn, tasks, chunksize=1)


def _changed(recorded: dict, settings: Settings) -> str:
    """The names of the settings that differ from a recorded set ('' when none do)."""
    return ", ".join(sorted(k for k, v in asdict(settings).items() if recorded.get(k) != v))


def _complete(out: Path, settings: Settings) -> manifests.Manifest | None:
    """OUT's manifest when OUT already holds the finished output of these settings, intact; else None."""
    manifest = _read_manifest(out)
    if manifest is None:
        return None
    changed = _changed(manifest.settings, settings)
    if changed:
        raise PrepError(f"{manifest.path}: OUT was prepared with other settings ({changed}); use a new --out")
    intact = all(_intact(out, s) for s in _shard_records(manifest)) and (out / LABELS).is_file()
    return manifest if intact else None


def _read_manifest(out: Path) -> manifests.Manifest | None:
    """OUT's manifest.json (None without one); one that cannot be read is a PrepError."""
    try:
        return manifests.load(out)
    except manifests.ManifestError as e:
        raise PrepError(str(e)) from e


def _shard_records(manifest: manifests.Manifest) -> list[dict]:
    """The shards as the journal records them."""
    return [s for split in manifest.raw["splits"].values() for s in split["shards"]]


def _claim_output(out: Path, settings: Settings) -> Path:
    """Create OUT/.prep for these settings, refusing a folder that holds someone else's shards."""
    state = out / STATE_DIR
    settings_file = state / "settings.json"
    if settings_file.is_file():
        changed = _changed(json.loads(settings_file.read_text()), settings)
        if changed:
            raise PrepError(
                f"{settings_file}: an interrupted run used other settings ({changed}); rerun it as it was, "
                "or use a new --out"
            )
    elif any(out.glob("train-*")) or any(out.glob("validation-*")):
        if not (out / MANIFEST).is_file():
            raise PrepError(f"{out}: already holds shards this tool did not start; use an empty --out")
    state.mkdir(parents=True, exist_ok=True)
    write_atomic(settings_file, json.dumps(asdict(settings), indent=1, sort_keys=True))
    remove_partials(out)
    remove_partials(state)
    shards_journal = state / "shards.jsonl"
    if (out / MANIFEST).is_file() and not shards_journal.exists():
        # A finished run whose output was damaged since: its intact shards need not be written again.
        records = _shard_records(_read_manifest(out))
        write_atomic(shards_journal, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return state


def _manifest(source: Source, settings: Settings, orders: dict, results: dict, plans: dict, shards: dict) -> dict:
    """The record of what was done: counts, checksums, and every skipped or re-encoded file."""
    skipped = [{"split": s, "file": p, "reason": r} for s, p, r in source.ignored]
    reencoded = []
    for split in SPLITS:
        for f, r in zip(orders[split], results[split], strict=True):
            if r.action != images.STORE:
                (skipped if r.action == images.SKIP else reencoded).append(
                    {"split": split, "file": f.path, "reason": r.reason}
                )
    splits = {}
    for split in SPLITS:
        per_class = [0] * len(source.wnids)
        for _, items in plans[split]:
            for item in items:
                per_class[item.label - 1] += 1
        n_skipped = sum(1 for e in skipped if e["split"] == split)
        splits[split] = {
            # Every file seen under the split's folder: images = files_found - skipped.
            "files_found": len(source.files[split]) + sum(1 for s, _, _ in source.ignored if s == split),
            "images": sum(s["records"] for s in shards[split]),
            "skipped": n_skipped,
            "reencoded": sum(1 for e in reencoded if e["split"] == split),
            "bytes": sum(s["bytes"] for s in shards[split]),
            "images_per_class": per_class,
            "shards": shards[split],
        }
    return {
        "format": "TFRecord of tf.train.Example, TensorFlow ImageNet schema; DALI index beside each shard",
        "source": settings.source,
        "source_kind": source.kind,
        "settings": asdict(settings),
        "label_base": 1,
        "num_classes": len(source.wnids),
        "labels_file": LABELS,
        "labels_without_image": source.labels_without_image,
        "splits": splits,
        "skipped": sorted(skipped, key=lambda e: (e["split"], e["file"])),
        "reencoded": sorted(reencoded, key=lambda e: (e["split"], e["file"])),
    }


def prepare(
    src: str,
    out: str,
    train_shards: int = 1024,
    val_shards: int = 128,
    workers: int = 1,
    resize_shorter: int | None = None,
    seed: int = 0,
    val_labels: str | None = None,
) -> dict:
    """Prepare SRC into OUT (resuming an interrupted run) and return the manifest."""
    for flag, value in (("--train-shards", train_shards), ("--val-shards", val_shards), ("--workers", workers)):
        if value < 1:
            raise PrepError(f"{flag} {value}: must be at least 1")
    if resize_shorter is not None and resize_shorter < 1:
        raise PrepError(f"--resize-shorter {resize_shorter}: must be a positive number of pixels")
    out_dir = Path(out).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise PrepError(f"--out {out}: is a file; give a folder")
    source = scan(src, val_labels, index_dir=out_dir / STATE_DIR / "index")
    counts = {"train": train_shards, "validation": val_shards}
    for split in SPLITS:
        _require_enough(split, len(source.files[split]), counts[split])
    settings = Settings(
        str(source.root), source.val_labels, train_shards, val_shards, resize_shorter, seed, _files_digest(source)
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    done = _complete(out_dir, settings)
    if done is not None:
        # An archive index this call built is of no further use.
        shutil.rmtree(out_dir / STATE_DIR, ignore_errors=True)
        print(f"{out_dir}: complete and matching {MANIFEST}; nothing to do")
        return done.raw
    state = _claim_output(out_dir, settings)
    orders = {split: shuffled(source.files[split], seed, split) for split in SPLITS}
    results, plans, shards = {}, {}, {}
    with _mapper(workers) as run_map:
        checks, writes = Journal(state / CHECKS_JOURNAL), Journal(state / "shards.jsonl")
        for split in SPLITS:
            results[split] = _check_split(split, source.files[split], orders[split], settings, checks, run_map)
            plans[split] = _plan_shards(split, orders[split], results[split], source, counts[split])
            shards[split] = _write_split(split, plans[split], out_dir, settings, writes, run_map)
    write_atomic(out_dir / LABELS, "".join(w + "\n" for w in source.wnids))
    manifest = _manifest(source, settings, orders, results, plans, shards)
    write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(state)
    _print_summary(out_dir, manifest)
    return manifest


def _print_summary(out: Path, manifest: dict) -> None:
    """Say how big the output is, what was dropped or changed, and how to read it back."""
    for split, s in manifest["splits"].items():
        print(f"{split}: {s['images']:,} images in {len(s['shards'])} shards, {s['bytes'] / 1e9:.2f} GB")
    print(
        f"skipped {len(manifest['skipped'])} files, re-encoded {len(manifest['reencoded'])} "
        f"(each listed with its reason in {out / MANIFEST})"
    )
    print(f"labels 1..{manifest['num_classes']} follow {out / LABELS}; check with: python -m data_prep.verify {out}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m data_prep.imagenet", description=__doc__.split("\n")[0])
    p.add_argument(
        "--src",
        required=True,
        help="raw ImageNet folder holding train/ and val/, or the downloads: image-net.org's "
        "ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz, or Kaggle's "
        "imagenet-object-localization-challenge.zip",
    )
    p.add_argument("--out", required=True, help="output folder for shards, indexes, labels.txt, manifest.json")
    p.add_argument("--train-shards", type=int, default=1024)
    p.add_argument("--val-shards", type=int, default=128)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes (default: all cores)")
    p.add_argument(
        "--resize-shorter",
        type=int,
        default=None,
        metavar="PX",
        help="re-encode images whose shorter side exceeds PX down to PX (default: keep originals)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the per-split shuffle before sharding")
    p.add_argument(
        "--val-labels",
        default=None,
        metavar="FILE",
        help="labels of a flat val/: 'filename wnid' lines or Kaggle's LOC_val_solution.csv",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: prepare, or print a one-line error and exit 2."""
    args = parse_args(argv)
    try:
        prepare(**vars(args))
    except (SourceError, ArchiveError, PrepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
