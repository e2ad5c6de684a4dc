"""Read a raw ImageNet source: classes, the file list of each split, validation labels, and each file's bytes.

Layouts: `train/<wnid>/*`; validation as `val/<wnid>/*`, or a flat `val/` labelled by Kaggle's
`LOC_val_solution.csv` (in SRC or its parent) or by `--val-labels FILE` ("filename wnid" lines).
Or, read in place (data_prep.archives): image-net.org's `ILSVRC2012_img_train.tar`, `ILSVRC2012_img_val.tar` and
`ILSVRC2012_devkit_t12.tar.gz`, or Kaggle's `imagenet-object-localization-challenge.zip`. Their images are named as
the extracted folders name them (`train/<wnid>/<file>`, `val/<file>`), so either gives the same shards.
Every problem that would waste a long run is raised here, before any image is read.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from data_prep import archives
from data_prep.archives import DEVKIT, KAGGLE_DATA, KAGGLE_ZIP, OFFICIAL, TRAIN_TAR, VAL_TAR, Member

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
KAGGLE_VAL_LABELS = "LOC_val_solution.csv"
# Output split name (shard prefix, as in public TF ImageNet shards) -> source folder.
SPLIT_FOLDERS = {"train": "train", "validation": "val"}


class SourceError(ValueError):
    """The source folder cannot be prepared; the message names the path and the fix."""


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One image to prepare: its path relative to SRC (as extracted) and its class, and where an archive holds it."""

    path: str
    wnid: str
    member: Member | None = None

    @property
    def place(self) -> tuple[str, int, str]:
        """Where the bytes lie, for reading in disk order: (archive, offset, "") or ("", 0, path)."""
        return (self.member.archive, self.member.offset, "") if self.member else ("", 0, self.path)


class Reader:
    """Reads source files' bytes: from SRC's folders, or by offset from its archives, each opened once."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.handles: dict[str, BinaryIO] = {}

    def read(self, f: SourceFile) -> bytes:
        """The file's bytes (OSError when they cannot be read)."""
        if f.member is None:
            return (self.root / f.path).read_bytes()
        if f.member.archive not in self.handles:
            self.handles[f.member.archive] = open(f.member.archive, "rb")
        return archives.read_member(self.handles[f.member.archive], f.member)

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles.values():
            handle.close()


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
    # What SRC holds: "folders", "image-net.org archives" or "Kaggle zip".
    kind: str = "folders"


def _is_image_name(name: str) -> bool:
    """True when the name has one of the accepted image extensions, in any case."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _stem(name: str) -> str:
    """A file name without its image extension ('ILSVRC2012_val_00000001.JPEG' -> '..._00000001')."""
    return name[: name.rfind(".")] if _is_image_name(name) else name


def _list_images(entries: list[tuple[str, bool]], rel: str, split: str, ignored: list) -> list[str]:
    """Sorted image file names among a folder's (name, is folder) entries; anything else is recorded in `ignored`."""
    names = []
    for name, is_dir in sorted(entries):
        if is_dir:
            ignored.append((split, f"{rel}/{name}/", "subfolder inside a class folder, not scanned"))
        elif _is_image_name(name):
            names.append(name)
        else:
            ignored.append((split, f"{rel}/{name}", "extension is not .jpeg/.jpg/.png (any case)"))
    return names


def _entries(folder: str | os.PathLike) -> list[tuple[str, bool]]:
    """A folder's (name, is folder) entries."""
    return [(e.name, e.is_dir()) for e in os.scandir(folder)]


def _entries_of_names(names: list[str]) -> list[tuple[str, bool]]:
    """An archive folder's (name, is folder) entries from the member names under it (a/b counts as folder a)."""
    return sorted({(n.split("/")[0], "/" in n) for n in names})


def _split_folder(root: Path, split: str) -> Path:
    """The existing, non-empty source folder of a split."""
    folder = root / SPLIT_FOLDERS[split]
    if not folder.is_dir():
        raise SourceError(f"{folder}: missing; expected {SPLIT_FOLDERS[split]}/<wnid>/<image> under --src")
    if not any(os.scandir(folder)):
        raise SourceError(f"{folder}: empty; the {split} split needs images")
    return folder


def _class_images(classes: dict[str, list[tuple[str, bool]]], rel: str, split: str, ignored: list, shown: str) -> dict:
    """{wnid: sorted image names} from each class's entries (the folder `rel` of SRC, held in `shown`, as errors
    name it); an empty class is an error."""
    images = {}
    for wnid in sorted(classes):
        images[wnid] = _list_images(classes[wnid], f"{rel}/{wnid}", split, ignored)
        if not images[wnid]:
            raise SourceError(f"{shown}: class {wnid} has no .JPEG/.jpg/.jpeg/.png images; add them or remove it")
    if not images:
        raise SourceError(f"{shown}: no class folders; expected {rel}/<wnid>/<image>")
    return images


def _scan_class_folders(folder: Path, split: str, ignored: list) -> dict[str, list[str]]:
    """{wnid: sorted image names} for a folder of class folders; an empty class is an error."""
    classes = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir():
            classes[entry.name] = _entries(entry.path)
        else:
            ignored.append((split, f"{folder.name}/{entry.name}", "file outside a class folder"))
    return _class_images(classes, folder.name, split, ignored, str(folder))


def _read_label_file(path: Path | str, text: str | None = None) -> dict[str, str]:
    """{file stem: wnid} from Kaggle's CSV (ImageId,PredictionString) or 'filename wnid' lines (`text`, else the
    file at `path`)."""
    if text is None:
        text = Path(path).read_text()
    labels = {}
    if text.startswith("ImageId,"):
        for row_no, row in enumerate(csv.reader(io.StringIO(text)), start=1):
            if row_no == 1 or not row:
                continue
            if len(row) < 2 or not row[1].split():
                raise SourceError(f"{path}:{row_no}: expected 'ImageId,<wnid> <box>...', got {','.join(row)!r}")
            labels[_stem(row[0])] = row[1].split()[0]
        return labels
    for line_no, line in enumerate(text.splitlines(), start=1):
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


def _labelled(names: list[str], labels: dict[str, str], label_file: str, where: str, wnids: set) -> list[tuple]:
    """(name, wnid) of each flat validation image, refusing an image without a label or of an unknown class."""
    unlabelled = [n for n in names if _stem(n) not in labels]
    if unlabelled:
        raise SourceError(
            f"{label_file}: no label for {len(unlabelled)} file(s) in {where} (first: {unlabelled[0]}); "
            "use the label file that belongs to this validation set"
        )
    for n in names:
        if labels[_stem(n)] not in wnids:
            raise SourceError(
                f"{label_file}: val/{n} is labelled {labels[_stem(n)]}, which is not a class folder in train/"
            )
    return [(n, labels[_stem(n)]) for n in names]


def _scan_flat_val(folder: Path, root: Path, label_file: Path | None, wnids: set, ignored: list) -> tuple:
    """Labelled files of a flat val/ folder, the label file used, and how many labels had no image."""
    names = _list_images(_entries(folder), folder.name, "validation", ignored)
    if not names:
        raise SourceError(f"{folder}: no .JPEG/.jpg/.jpeg/.png images")
    label_file = label_file or _find_kaggle_labels(root)
    if label_file is None:
        raise SourceError(
            f"{folder}: flat validation folder without labels; put {KAGGLE_VAL_LABELS} in {root} or its parent, "
            "or pass --val-labels FILE ('filename wnid' lines)"
        )
    labels = _read_label_file(label_file)
    files = [SourceFile(f"{folder.name}/{n}", w) for n, w in _labelled(names, labels, str(label_file), folder, wnids)]
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


def scan(src: str | os.PathLike, val_labels: str | os.PathLike | None = None, index_dir: Path | None = None) -> Source:
    """Scan SRC into classes and per-split file lists, raising SourceError on any layout problem; archives are
    indexed into `index_dir`."""
    root = Path(src).resolve()
    if not root.is_dir():
        raise SourceError(f"--src {src}: no such directory; point it at the folder holding train/ and val/")
    downloads = archives.found(root)
    extracted = [f"{name}/" for name in SPLIT_FOLDERS.values() if (root / name).exists()]
    if downloads and extracted:
        raise SourceError(
            f"{root}: holds both {', '.join(downloads)} and {', '.join(extracted)}; "
            "point --src at a folder with only the archives or only the extracted folders"
        )
    if downloads:
        if val_labels:
            raise SourceError(f"--val-labels {val_labels}: the archives carry their own validation labels; drop it")
        if index_dir is None:
            raise ValueError("scan: reading archives needs an index_dir")
        return _scan_archives(root, downloads, index_dir)
    label_file = Path(val_labels).resolve() if val_labels else None
    if label_file and not label_file.is_file():
        raise SourceError(f"--val-labels {val_labels}: no such file")
    ignored: list = []
    train = _scan_class_folders(_split_folder(root, "train"), "train", ignored)
    wnids = sorted(train)
    train_files = [SourceFile(f"train/{w}/{n}", w) for w in wnids for n in train[w]]
    val_files, used, labels_without_image = _scan_val(root, wnids, label_file, ignored)
    return Source(root, wnids, {"train": train_files, "validation": val_files}, ignored, used, labels_without_image)


# ---------------------------------------------------------------- the downloads, read in place


def _scan_archives(root: Path, downloads: list[str], index_dir: Path) -> Source:
    """The Source of image-net.org's three files or of Kaggle's zip, whichever `root` holds."""
    if KAGGLE_ZIP in downloads:
        if len(downloads) > 1:
            raise SourceError(
                f"{root}: holds both {KAGGLE_ZIP} and {', '.join(d for d in downloads if d != KAGGLE_ZIP)}; "
                "keep one download in --src"
            )
        return _scan_kaggle(root / KAGGLE_ZIP)
    missing = [name for name in OFFICIAL if name not in downloads]
    if missing:
        raise SourceError(f"{root}: has {', '.join(downloads)} but not {', '.join(missing)}; download it beside them")
    devkit = archives.read_devkit(root / DEVKIT)
    ignored: list = []
    train, wnids = _train_tar(root / TRAIN_TAR, index_dir / "train.jsonl", set(devkit.classes.values()), ignored)
    val = archives.index_tar(root / VAL_TAR, index_dir / "val.jsonl", nested=False).get("", [])
    val_files = _val_tar(root, val, devkit, set(wnids), ignored)
    files = {"train": train, "validation": val_files}
    return Source(root, wnids, files, ignored, str(root / DEVKIT), 0, "image-net.org archives")


def _train_tar(path: Path, index: Path, classes: set[str], ignored: list) -> tuple[list[SourceFile], list[str]]:
    """The training images of the train tar (one inner tar per class) and their sorted classes."""
    groups = archives.index_tar(path, index, nested=True)
    for name, _ in groups.pop("", []):
        ignored.append(("train", f"train/{name}", "file outside a class folder"))
    unknown = sorted(g for g in groups if g.removesuffix(".tar") not in classes)
    if unknown:
        raise SourceError(
            f"{path}: {unknown[0]} is not a class in {DEVKIT}'s meta.mat ({len(unknown)} such); "
            "use the train tar and the devkit of one release"
        )
    members = {g.removesuffix(".tar"): dict(group) for g, group in groups.items()}
    entries = {wnid: _entries_of_names(list(group)) for wnid, group in members.items()}
    images = _class_images(entries, "train", "train", ignored, str(path))
    files = [SourceFile(f"train/{w}/{n}", w, members[w][n]) for w in sorted(images) for n in images[w]]
    return files, sorted(images)


def _val_tar(root: Path, val: list[tuple[str, Member]], devkit: archives.Devkit, wnids: set, ignored: list) -> list:
    """The validation images of the flat val tar, labelled by the devkit's ground truth in file order."""
    members = dict(val)
    names = _flat_val_images(list(members), str(root / VAL_TAR), ignored)
    if len(names) != len(devkit.ground_truth):
        raise SourceError(
            f"{root / DEVKIT}: {archives.GROUND_TRUTH} has {len(devkit.ground_truth)} lines for {len(names)} images "
            f"in {VAL_TAR}; use the devkit that belongs to this validation tar"
        )
    unknown = sorted({i for i in devkit.ground_truth if i not in devkit.classes})
    if unknown:
        raise SourceError(f"{root / DEVKIT}: the ground truth's id {unknown[0]} is no class in {archives.META}")
    labels = {_stem(n): devkit.classes[i] for n, i in zip(names, devkit.ground_truth, strict=True)}
    pairs = _labelled(names, labels, str(root / DEVKIT), root / VAL_TAR, wnids)
    return [SourceFile(f"val/{n}", w, members[n]) for n, w in pairs]


def _flat_val_images(names: list[str], shown: str, ignored: list) -> list[str]:
    """Sorted image names of an archive's flat validation folder (named `shown` in errors); a folder in it is
    refused."""
    folders = sorted({n.split("/")[0] for n in names if "/" in n})
    if folders:
        raise SourceError(f"{shown}: holds folders ({folders[0]}/); expected the flat validation folder")
    return _list_images([(n, False) for n in names], "val", "validation", ignored)


def _scan_kaggle(path: Path) -> Source:
    """The Source of Kaggle's zip: ILSVRC/Data/CLS-LOC/{train/<wnid>,val}/ and LOC_val_solution.csv."""
    members = archives.zip_listing(path)
    if KAGGLE_VAL_LABELS not in members:
        raise SourceError(f"{path}: has no {KAGGLE_VAL_LABELS}; download the challenge's whole zip again")
    under = {split: f"{KAGGLE_DATA}{folder}/" for split, folder in SPLIT_FOLDERS.items()}
    split_members = {
        split: {n[len(prefix) :]: m for n, m in members.items() if n.startswith(prefix)}
        for split, prefix in under.items()
    }
    for split, prefix in under.items():
        if not split_members[split]:
            raise SourceError(f"{path}: has nothing under {prefix}; download the challenge's whole zip again")
    ignored: list = []
    train = split_members["train"]
    classes: dict[str, list[str]] = {}
    for name in train:
        if "/" in name:
            wnid, rest = name.split("/", 1)
            classes.setdefault(wnid, []).append(rest)
        else:
            ignored.append(("train", f"train/{name}", "file outside a class folder"))
    entries = {w: _entries_of_names(n) for w, n in classes.items()}
    images = _class_images(entries, "train", "train", ignored, f"{path}:{KAGGLE_DATA}train")
    wnids = sorted(images)
    train_files = [SourceFile(f"train/{w}/{n}", w, train[f"{w}/{n}"]) for w in wnids for n in images[w]]
    val = split_members["validation"]
    names = _flat_val_images(list(val), f"{path}:{under['validation']}", ignored)
    where = f"{path}:{KAGGLE_VAL_LABELS}"
    labels = _read_label_file(where, archives.zip_text(path, KAGGLE_VAL_LABELS))
    pairs = _labelled(names, labels, where, path, set(wnids))
    val_files = [SourceFile(f"val/{n}", w, val[n]) for n, w in pairs]
    files = {"train": train_files, "validation": val_files}
    return Source(path.parent, wnids, files, ignored, where, len(labels) - len(names), "Kaggle zip")
