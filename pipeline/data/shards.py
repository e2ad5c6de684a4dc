"""A shard directory as the reader sees it: the shard files, their DALI indexes, label base and class names.

Shards from `data_prep` come with `.idx` files, `manifest.json` and `labels.txt`. Third-party
TFRecord sets (the TensorFlow ImageNet build, for one) often have none of them: missing indexes
are built here, beside the shards or, when the data folder is read-only, in a cache folder, and
labels follow the TensorFlow convention (1-based, 1000 classes unless `--num-classes` says otherwise).

    python -m pipeline.data.shards --data-dir DIR [--index-dir D] [--num-classes K]   (build missing indexes, count)
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline import options
from pipeline.format import example, tfrecord
from pipeline.format import manifest as manifests
from pipeline.format.atomic import write_atomic
from pipeline.format.layout import (
    LABELS,
    MANIFEST,
    SHARD_NAME,
    SPLITS,
    TF_LABEL_BASE,
    TF_NUM_CLASSES,
    index_path,
    missing_shards,
)

# The label of a padding sample in a batch (0-based labels otherwise): losses and counts leave it out.
IGNORE = -1


class DataError(ValueError):
    """The shard directory cannot be read as asked; the message names the file, the value and the fix."""


@dataclass(frozen=True)
class Split:
    """The shards of one split in name order, the index DALI reads for each, and their record counts."""

    name: str
    files: tuple[str, ...]
    indexes: tuple[str, ...]
    counts: tuple[int, ...]

    @property
    def images(self) -> int:
        """Records in the whole split."""
        return sum(self.counts)


@dataclass(frozen=True)
class ShardSet:
    """Everything the reader needs to know about a shard directory."""

    root: Path
    splits: dict[str, Split]
    # Labels in the shards run label_base .. label_base + num_classes - 1; the loss wants 0-based.
    label_base: int
    num_classes: int
    # One name per 0-based label: wnids from labels.txt, or "class <k>" without one.
    class_names: tuple[str, ...]
    # Where label_base and num_classes came from, for error messages.
    label_source: str

    @property
    def has_manifest(self) -> bool:
        """Whether the labels are data_prep's (manifest.json) rather than the TensorFlow convention."""
        return (self.root / MANIFEST).is_file()


def shard_bounds(total: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """[start, end) of the samples DALI's readers give shard `shard_id` of `num_shards`."""
    return total * shard_id // num_shards, total * (shard_id + 1) // num_shards


def split_files(root: Path, split: str) -> list[Path]:
    """Shard files of a split (`train-*`, `validation-*`), without indexes or temporary files, in name order."""
    files = sorted(p for p in root.glob(f"{split}-*") if p.is_file() and not p.name.endswith((".idx", ".partial")))
    lost = missing_shards([p for p in files if SHARD_NAME.match(p.name)])
    if lost:
        raise DataError(
            f"{root / lost[0]}: missing ({len(lost)} shard(s) of the series absent); "
            "copy the whole set or rebuild it with python -m data_prep.imagenet"
        )
    return files


def default_index_cache(root: Path) -> Path:
    """Where indexes of a read-only shard folder go: one folder per data directory under the user cache."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return base / "imagenet-pipeline" / "indexes" / digest


def _writable(folder: Path) -> bool:
    """Whether a file can be created in `folder` (tried for real: permissions, read-only mounts, root squash)."""
    probe = folder / f".write-probe.{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
        return True
    except OSError:
        return False


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder`, so ranks on one host build each index once."""
    with open(folder / ".index.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _index_records(index: Path, shard: Path) -> int | None:
    """Records listed in `index` if it covers exactly the bytes of `shard`, else None."""
    spans = tfrecord.index_spans(index.read_text())
    if not spans:
        return None
    offset, size = spans[-1]
    return len(spans) if offset + size == shard.stat().st_size else None


def build_index(shard: Path, index: Path) -> int:
    """Write DALI's index for `shard` to `index` (atomically) from the record headers; returns the record count."""
    with open(shard, "rb") as f:
        try:
            spans = list(tfrecord.record_spans(f, str(shard)))
        except tfrecord.RecordError as e:
            raise DataError(f"{e}; check the set with python -m data_prep.verify {shard.parent}") from None
    if not spans:
        raise DataError(f"{shard}: empty shard (no records); remove it or rebuild the set")
    write_atomic(index, "".join(tfrecord.index_line(offset, size) for offset, size in spans))
    return len(spans)


def ensure_index(shard: Path, home: Callable[[], Path]) -> tuple[Path, int]:
    """The index of `shard` and its record count, building a missing one in the folder `home()` names."""
    beside = index_path(shard)
    if beside.is_file():
        count = _index_records(beside, shard)
        if count is None:
            raise DataError(
                f"{beside}: does not match {shard.name} ({shard.stat().st_size} bytes); if the shard is damaged run "
                f"python -m data_prep.verify {shard.parent}, else delete the .idx and it is rebuilt"
            )
        return beside, count
    folder = home()
    folder.mkdir(parents=True, exist_ok=True)
    index = folder / beside.name
    with _locked(folder):
        fresh = index.is_file() and index.stat().st_mtime >= shard.stat().st_mtime
        count = _index_records(index, shard) if fresh else None
        if count is None:
            count = build_index(shard, index)
    return index, count


def _open_split(root: Path, split: str, home: Callable[[], Path]) -> Split:
    """Find a split's shards and make sure each has an index."""
    files = split_files(root, split)
    if not files:
        raise DataError(
            f"{root}: no {split}-* shards; build them with make prep-imagenet (python -m data_prep.imagenet)"
        )
    indexed = [ensure_index(f, home) for f in files]
    return Split(split, tuple(map(str, files)), tuple(str(i) for i, _ in indexed), tuple(n for _, n in indexed))


def _labels_from(manifest: manifests.Manifest | None, num_classes: int | None) -> tuple[int, int, str]:
    """(label_base, num_classes, where they came from): manifest.json first, else the TensorFlow convention."""
    if manifest is None:
        if num_classes is not None and num_classes < 1:
            raise DataError(f"--num-classes {num_classes}: must be at least 1")
        return TF_LABEL_BASE, num_classes or TF_NUM_CLASSES, "TensorFlow convention: 1-based, --num-classes"
    if num_classes is not None and num_classes != manifest.num_classes:
        raise DataError(
            f"--num-classes {num_classes}: {manifest.path} says {manifest.num_classes} classes; drop the flag"
        )
    return manifest.label_base, manifest.num_classes, str(manifest.path)


def _manifest(root: Path) -> manifests.Manifest | None:
    """The folder's manifest.json, None without one; one that cannot be read is a DataError."""
    try:
        return manifests.load(root)
    except manifests.ManifestError as e:
        raise DataError(str(e)) from e


def _class_names(root: Path, num_classes: int) -> tuple[str, ...]:
    """One name per 0-based label: the wnids of labels.txt (line n is label n), or `class <k>`."""
    path = root / LABELS
    if not path.is_file():
        return tuple(f"class {k}" for k in range(num_classes))
    names = tuple(path.read_text().split())
    if len(names) != num_classes:
        raise DataError(f"{path}: {len(names)} names for {num_classes} classes; rebuild it with data_prep.imagenet")
    return names


def _check_manifest_counts(root: Path, manifest: manifests.Manifest | None, splits: dict[str, Split]) -> None:
    """The indexes must hold as many records as manifest.json says each split has."""
    if manifest is None:
        return
    for name, split in splits.items():
        want = manifest.images.get(name)
        if want is not None and want != split.images:
            raise DataError(
                f"{root}: {name} shards hold {split.images} records, {MANIFEST} says {want}; "
                f"run python -m data_prep.verify {root}"
            )


def open_shards(
    data_dir: str | os.PathLike,
    splits: tuple[str, ...] = SPLITS,
    num_classes: int | None = None,
    index_dir: str | os.PathLike | None = None,
) -> ShardSet:
    """Read a shard directory: its splits (building missing indexes), label base, class count and names."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory; pass --data-dir pointing at the shards (make prep-imagenet)")
    cache = Path(index_dir) if index_dir else default_index_cache(root)

    @functools.cache
    def home() -> Path:
        """Where missing indexes go: beside the shards, or the cache when the data folder is read-only.
        Probed once per open, and only if an index is missing."""
        return root if _writable(root) else cache

    opened = {s: _open_split(root, s, home) for s in splits}
    manifest = _manifest(root)
    _check_manifest_counts(root, manifest, opened)
    base, classes, source = _labels_from(manifest, num_classes)
    return ShardSet(root, opened, base, classes, _class_names(root, classes), source)


@dataclass(frozen=True)
class ShardOptions:
    """Which shards: what every tool that reads them is told (python -m pipeline.data.shards, preview, training)."""

    # Folder of train-*/validation-* TFRecord shards (make prep-imagenet).
    data_dir: str = ""
    # Class count of shards without manifest.json (their labels are 1-based, TF style; default 1000).
    num_classes: int | None = None
    # Where missing indexes go when the data folder is read-only (default: under ~/.cache).
    index_dir: str | None = None

    def __post_init__(self):
        if not self.data_dir:
            raise ValueError("--data-dir is required: the folder of train-*/validation-* shards")


def find_bad_label(split: Split, label_base: int, num_classes: int) -> str | None:
    """The first record of a split whose label is outside the range, as `shard: record at offset N has label L`.

    Only called after a batch held such a label: it reads the shards, so it is slow on ImageNet.
    """
    for path in split.files:
        with open(path, "rb") as f:
            for record in tfrecord.read_records(f, path, check_crc=False):
                label = example.decode(record.data).get(example.LABEL, [None])[0]
                if label is None or not label_base <= label < label_base + num_classes:
                    return f"{path}: record at offset {record.offset} has label {label}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Build the missing DALI indexes of a shard folder and count its records; bad input: one line, exit 2."""
    p = options.parser("python -m pipeline.data.shards", main.__doc__.split(";")[0], {"shards": ShardOptions})
    try:
        which = p.parse_args(argv).shards
        shards = open_shards(which.data_dir, SPLITS, which.num_classes, which.index_dir)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split in shards.splits.values():
        where = sorted({os.path.dirname(i) for i in split.indexes})
        print(f"{split.name}: {len(split.files)} shards, {split.images:,} records, indexes in {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
