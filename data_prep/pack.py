"""Pack a generated ImageNet folder into the files its publishers hand out, for tests, the demo and benchmarks.

- `official`: image-net.org's `ILSVRC2012_img_train.tar` (one inner tar per class), a flat `ILSVRC2012_img_val.tar`,
  and `ILSVRC2012_devkit_t12.tar.gz` whose `data/meta.mat` is a MATLAB struct array `synsets` written by
  `scipy.io.savemat` in the real layout: leaf synsets numbered in a seeded order unlike the sorted WNIDs, and
  non-leaf synsets (with children) besides them; `data/ILSVRC2012_validation_ground_truth.txt` gives one
  ILSVRC2012_ID per validation image in file order.
- `kaggle`: `imagenet-object-localization-challenge.zip` with `ILSVRC/Data/CLS-LOC/{train/<wnid>,val}/`,
  `LOC_val_solution.csv` and `LOC_synset_mapping.txt`; members alternate between deflated and stored.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np

from data_prep.archives import DEVKIT, GROUND_TRUTH, KAGGLE_DATA, KAGGLE_ZIP, META, TRAIN_TAR, VAL_TAR
from data_prep.source import KAGGLE_VAL_LABELS

DEVKIT_TOP = "ILSVRC2012_devkit_t12/"
SYNSET_FIELDS = (
    "ILSVRC2012_ID",
    "WNID",
    "words",
    "gloss",
    "num_children",
    "children",
    "wordnet_height",
    "num_train_images",
)


def class_files(tree: Path) -> dict[str, dict[str, bytes]]:
    """{wnid: {file name: bytes}} of a tree's train/ folder."""
    return {
        d.name: {f.name: f.read_bytes() for f in sorted(d.iterdir())}
        for d in sorted((tree / "train").iterdir())
        if d.is_dir()
    }


def val_files(tree: Path) -> list[tuple[str, str, bytes]]:
    """(file name, wnid, bytes) of a tree's val/ in class folders, sorted by name (the validation tar's order)."""
    files = [(f.name, d.name, f.read_bytes()) for d in (tree / "val").iterdir() for f in d.iterdir()]
    return sorted(files)


def tar_bytes(files: list[tuple[str, bytes]], compression: str = "") -> bytes:
    """A tar (GNU format, as image-net.org's) of (name, bytes) in the given order; `compression` "gz" gzips it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}", format=tarfile.GNU_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_335_000_000
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def synset_ids(wnids: list[str], seed: int) -> dict[str, int]:
    """ILSVRC2012_IDs 1..n for the classes, in a seeded order (never the sorted one when n > 1)."""
    order = list(np.random.default_rng(seed).permutation(len(wnids)))
    if len(wnids) > 1 and order == sorted(order):
        order = order[::-1]
    return {w: int(i) + 1 for w, i in zip(wnids, order, strict=True)}


def meta_mat(ids: dict[str, int], parents: int = 3) -> bytes:
    """meta.mat: the struct array `synsets` of the leaves (`ids`) and of `parents` non-leaf synsets above them."""
    from scipy.io import savemat

    rows = [(i, w, f"class {w}", "a generated class", 0, np.zeros((1, 0), np.uint16), 0, 30) for w, i in ids.items()]
    leaves = sorted(ids.values())
    for p in range(parents):
        children = np.array([leaves[p::parents]], dtype=np.uint16)
        rows.append((len(ids) + p + 1, f"n9{p:07d}", f"parent {p}", "a group", children.size, children, 1, 0))
    rows.sort(key=lambda row: row[0])
    synsets = np.zeros((len(rows), 1), dtype=[(f, object) for f in SYNSET_FIELDS])
    for k, (i, wnid, words, gloss, n, children, height, images) in enumerate(rows):
        synsets[k, 0] = (np.uint16(i), wnid, words, gloss, np.uint8(n), children, np.uint8(height), np.uint16(images))
    buffer = io.BytesIO()
    savemat(buffer, {"synsets": synsets})
    return buffer.getvalue()


def devkit_bytes(meta: bytes | None, ground_truth: list[int] | None) -> bytes:
    """ILSVRC2012_devkit_t12.tar.gz holding meta.mat and the validation ground truth under its top folder (either
    left out where None, for the tests of a broken devkit)."""
    truth = None if ground_truth is None else "".join(f"{i}\n" for i in ground_truth).encode()
    files = [(DEVKIT_TOP + "COPYING", b"devkit\n"), (DEVKIT_TOP + META, meta), (DEVKIT_TOP + GROUND_TRUTH, truth)]
    return tar_bytes([(name, data) for name, data in files if data is not None], "gz")


def official(tree: Path, out: Path, seed: int = 0) -> Path:
    """Write image-net.org's three downloads of `tree` (val/ in class folders) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    classes = class_files(tree)
    # Inner tars list their images in reverse name order: the prep must sort them as a folder listing is sorted.
    inner = [(f"{w}.tar", tar_bytes(sorted(files.items(), reverse=True))) for w, files in classes.items()]
    (out / TRAIN_TAR).write_bytes(tar_bytes(inner))
    val = val_files(tree)
    (out / VAL_TAR).write_bytes(tar_bytes([(name, data) for name, _, data in val]))
    ids = synset_ids(list(classes), seed)
    (out / DEVKIT).write_bytes(devkit_bytes(meta_mat(ids), [ids[w] for _, w, _ in val]))
    return out


def kaggle(tree: Path, out: Path) -> Path:
    """Write Kaggle's challenge zip of `tree` (val/ in class folders) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    classes, val = class_files(tree), val_files(tree)
    rows = "".join(f"{Path(name).stem},{w} 1 1 10 10\n" for name, w, _ in val)
    members = [(f"{KAGGLE_DATA}train/{w}/{n}", data) for w, files in classes.items() for n, data in files.items()]
    members += [(f"{KAGGLE_DATA}val/{name}", data) for name, _, data in val]
    with zipfile.ZipFile(out / KAGGLE_ZIP, "w") as z:
        z.writestr("LOC_synset_mapping.txt", "".join(f"{w} class {w}\n" for w in classes))
        z.writestr(KAGGLE_VAL_LABELS, "ImageId,PredictionString\n" + rows, zipfile.ZIP_DEFLATED)
        for k, (name, data) in enumerate(members):
            z.writestr(name, data, zipfile.ZIP_DEFLATED if k % 2 else zipfile.ZIP_STORED)
    return out
