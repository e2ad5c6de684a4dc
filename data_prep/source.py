"""Read a raw ImageNet folder: classes, the file list of each split, and validation labels.

Layouts: `train/<wnid>/*`; validation as `val/<wnid>/*`, or a flat `val/` labelled by Kaggle's
`LOC_val_solution.csv` (in SRC or its parent) or by `--val-labels FILE` ("filename wnid" lines).
Every problem that would waste a long run is raised here, before any image is read.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
KAGGLE_VAL_LABELS = "LOC_val_solution.csv"
# Output split name (shard prefix, as in public TF ImageNet shards) -> source folder.
SPLIT_FOLDERS = {"train": "train", "validation": "val"}


class SourceError(ValueError):
    """The source folder cannot be prepared; the message names the path and the fix."""


@dataclass(frozen=True)
class SourceFile:
    """One image to prepare: its path relative to SRC and its class."""

    path: str
    wnid: str


@dataclass
class Source:
    """Everything data prep needs to know about SRC, gathered before any image is decoded."""

    root: Path
    # Sorted WordNet ids; label = position + 1 (TF convention, 0 is "background").
    wnids: list[str]
    files: dict[str, list[SourceFile]]
    # Files never considered (wrong extension, outside class folders): (split, path, reason).
    ignored: list[tuple[str, str, str]] = field(default_factory=list)
    # Where validation labels came from: "folders" or a file path.
    val_labels: str = "folders"
    # Entries of a label file whose image is not in val/ (reported, not fatal).
    labels_without_image: int = 0


def _is_image_name(name: str) -> bool:
    """True when the name has one of the accepted image extensions, in any case."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _stem(name: str) -> str:
    """A file name without its image extension ('ILSVRC2012_val_00000001.JPEG' -> '..._00000001')."""
    return name[: name.rfind(".")] if _is_image_name(name) else name


def _list_images(folder: Path, rel: str, split: str, ignored: list) -> list[str]:
    """Sorted image file names in one folder; anything else is recorded in `ignored`."""
    names = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir():
            ignored.append((split, f"{rel}/{entry.name}/", "subfolder inside a class folder, not scanned"))
        elif _is_image_name(entry.name):
            names.append(entry.name)
        else:
            ignored.append((split, f"{rel}/{entry.name}", "extension is not .jpeg/.jpg/.png (any case)"))
    return names


def _split_folder(root: Path, split: str) -> Path:
    """The existing, non-empty source folder of a split."""
    folder = root / SPLIT_FOLDERS[split]
    if not folder.is_dir():
        raise SourceError(f"{folder}: missing; expected {SPLIT_FOLDERS[split]}/<wnid>/<image> under --src")
    if not any(os.scandir(folder)):
        raise SourceError(f"{folder}: empty; the {split} split needs images")
    return folder


def _scan_class_folders(folder: Path, split: str, ignored: list) -> dict[str, list[str]]:
    """{wnid: sorted image names} for a folder of class folders; an empty class is an error."""
    classes = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_dir():
            ignored.append((split, f"{folder.name}/{entry.name}", "file outside a class folder"))
            continue
        names = _list_images(Path(entry.path), f"{folder.name}/{entry.name}", split, ignored)
        if not names:
            raise SourceError(f"{entry.path}: class folder has no .JPEG/.jpg/.jpeg/.png images; add them or remove it")
        classes[entry.name] = names
    if not classes:
        raise SourceError(f"{folder}: no class folders; expected {folder.name}/<wnid>/<image>")
    return classes


def _read_label_file(path: Path) -> dict[str, str]:
    """{file stem: wnid} from Kaggle's CSV (ImageId,PredictionString) or 'filename wnid' lines."""
    labels = {}
    with open(path, newline="") as f:
        first = f.readline()
        f.seek(0)
        if first.startswith("ImageId,"):
            for row_no, row in enumerate(csv.reader(f), start=1):
                if row_no == 1 or not row:
                    continue
                if len(row) < 2 or not row[1].split():
                    raise SourceError(f"{path}:{row_no}: expected 'ImageId,<wnid> <box>...', got {','.join(row)!r}")
                labels[_stem(row[0])] = row[1].split()[0]
            return labels
        for line_no, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise SourceError(f"{path}:{line_no}: expected 'filename wnid', got {line.strip()!r}")
            labels[_stem(parts[0])] = parts[1]
    return labels


def _find_kaggle_labels(root: Path) -> Path | None:
    """Kaggle's validation label CSV in SRC or its parent, if present."""
    for folder in (root, root.parent):
        if (folder / KAGGLE_VAL_LABELS).is_file():
            return folder / KAGGLE_VAL_LABELS
    return None


def _scan_flat_val(folder: Path, root: Path, label_file: Path | None, wnids: set, ignored: list) -> tuple:
    """Labelled files of a flat val/ folder, the label file used, and how many labels had no image."""
    names = _list_images(folder, folder.name, "validation", ignored)
    if not names:
        raise SourceError(f"{folder}: no .JPEG/.jpg/.jpeg/.png images")
    label_file = label_file or _find_kaggle_labels(root)
    if label_file is None:
        raise SourceError(
            f"{folder}: flat validation folder without labels; put {KAGGLE_VAL_LABELS} in {root} or its parent, "
            "or pass --val-labels FILE ('filename wnid' lines)"
        )
    labels = _read_label_file(label_file)
    unlabelled = [n for n in names if _stem(n) not in labels]
    if unlabelled:
        raise SourceError(
            f"{label_file}: no label for {len(unlabelled)} file(s) in {folder} (first: {unlabelled[0]}); "
            "use the label file that belongs to this validation set"
        )
    files = [SourceFile(f"{folder.name}/{n}", labels[_stem(n)]) for n in names]
    for f in files:
        if f.wnid not in wnids:
            raise SourceError(f"{label_file}: {f.path} is labelled {f.wnid}, which is not a class folder in train/")
    return files, str(label_file), len(labels) - len(names)


def _scan_val(root: Path, wnids: list[str], label_file: Path | None, ignored: list) -> tuple:
    """Labelled validation files, where their labels came from, and how many labels had no image."""
    folder = _split_folder(root, "validation")
    entries = list(os.scandir(folder))
    has_dirs = any(e.is_dir() for e in entries)
    if has_dirs and any(e.is_file() and _is_image_name(e.name) for e in entries):
        raise SourceError(f"{folder}: mixes class folders and image files; use one layout")
    if has_dirs and label_file:
        raise SourceError(f"--val-labels {label_file}: given, but {folder} holds class folders, not files")
    if not has_dirs:
        return _scan_flat_val(folder, root, label_file, set(wnids), ignored)
    val = _scan_class_folders(folder, "validation", ignored)
    unknown = sorted(set(val) - set(wnids))
    if unknown:
        raise SourceError(f"{folder / unknown[0]}: class {unknown[0]} is not a class folder in train/")
    return [SourceFile(f"val/{w}/{n}", w) for w in sorted(val) for n in val[w]], "folders", 0


def scan(src: str | os.PathLike, val_labels: str | os.PathLike | None = None) -> Source:
    """Scan SRC into classes and per-split file lists, raising SourceError on any layout problem."""
    root = Path(src).resolve()
    if not root.is_dir():
        raise SourceError(f"--src {src}: no such directory; point it at the folder holding train/ and val/")
    label_file = Path(val_labels).resolve() if val_labels else None
    if label_file and not label_file.is_file():
        raise SourceError(f"--val-labels {val_labels}: no such file")
    ignored: list = []
    train = _scan_class_folders(_split_folder(root, "train"), "train", ignored)
    wnids = sorted(train)
    train_files = [SourceFile(f"train/{w}/{n}", w) for w in wnids for n in train[w]]
    val_files, used, labels_without_image = _scan_val(root, wnids, label_file, ignored)
    return Source(root, wnids, {"train": train_files, "validation": val_files}, ignored, used, labels_without_image)
