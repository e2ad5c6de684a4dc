"""End to end: a quirky ImageNet tree becomes balanced, class-mixed, verified TFRecord shards."""

import hashlib
import io
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from data_prep.imagenet import PrepError, balanced_slices, prepare
from data_prep.synthetic import generate
from tests import procs
from tests.runs import TREE, run_module
from tests.shardsets import read_shard, shards_of, tree_bytes

# Per class, synthetic --quirks adds to train/: 5 files to re-encode (CMYK, YCCK, PNG named .JPEG,
# alpha PNG, .PNG), 3 to skip (empty, truncated, not an image), 3 clean oddities (gray, progressive, .jpg);
# to val/: CMYK, PNG named .JPEG (re-encode), grayscale (store), truncated (skip). Plus one README.txt.
CLASSES = TREE["classes"]
TRAIN_IMAGES = CLASSES * (TREE["train_per_class"] + 8)
VAL_IMAGES = CLASSES * (TREE["val_per_class"] + 3)


def all_records(out: Path, split: str) -> list[dict]:
    """Every record of a split, in shard order."""
    return [r for shard in shards_of(out, split) for r in read_shard(shard)]


def test_output_files_and_shard_names(prepared):
    names = sorted(p.name for p in prepared.iterdir())
    shards = [f"train-{i:05d}-of-00004" for i in range(4)] + [f"validation-{i:05d}-of-00003" for i in range(3)]
    assert names == sorted(shards + [s + ".idx" for s in shards] + ["labels.txt", "manifest.json"])


def test_every_usable_image_lands_once_and_shards_are_balanced(prepared):
    for split, expected, count in (("train", TRAIN_IMAGES, 4), ("validation", VAL_IMAGES, 3)):
        sizes = [len(read_shard(s)) for s in shards_of(prepared, split)]
        assert len(sizes) == count
        assert sum(sizes) == expected
        assert max(sizes) - min(sizes) <= 1, sizes
        names = [r["image/filename"] for r in all_records(prepared, split)]
        assert len(set(names)) == len(names) == expected


def test_records_follow_the_tf_imagenet_schema_and_label_order(prepared, quirky_tree):
    wnids = (prepared / "labels.txt").read_text().split()
    assert wnids == sorted(p.name for p in (quirky_tree / "train").iterdir())
    reencoded = {Path(e["file"]).name for e in json.loads((prepared / "manifest.json").read_text())["reencoded"]}
    for split in ("train", "validation"):
        for r in all_records(prepared, split):
            synset = r["image/class/synset"].decode()
            assert r["image/class/label"] == wnids.index(synset) + 1  # 1-based, 0 is background
            source = quirky_tree / ("train" if split == "train" else "val") / synset / r["image/filename"].decode()
            image = Image.open(io.BytesIO(r["image/encoded"]))
            image.load()
            assert (r["image/format"], image.format) == (b"JPEG", "JPEG")
            assert (r["image/width"], r["image/height"]) == image.size
            assert r["image/channels"] == len(image.getbands())
            assert r["image/colorspace"] == (b"RGB" if image.mode == "RGB" else b"Grayscale")
            if source.name in reencoded:
                assert image.mode == "RGB"
            else:  # valid JPEGs are stored byte for byte, never re-encoded
                assert r["image/encoded"] == source.read_bytes()


def test_manifest_lists_every_skipped_and_reencoded_file_with_counts_and_checksums(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    kind = {"train": lambda name: name.split("_", 1)[-1], "validation": lambda name: "val image"}
    skipped = {
        (e["split"], kind[e["split"]](Path(e["file"]).name), e["reason"].split(":")[0]) for e in manifest["skipped"]
    }
    assert skipped == {
        ("train", "README.txt", "extension is not .jpeg/.jpg/.png (any case)"),
        ("train", "empty.JPEG", "empty file"),
        ("train", "notimage.JPEG", "not an image"),
        ("train", "truncated.JPEG", "undecodable"),
        ("validation", "val image", "undecodable"),
    }
    assert len(manifest["skipped"]) == 1 + 3 * CLASSES + CLASSES
    reasons = Counter(e["reason"] for e in manifest["reencoded"])
    assert reasons == {
        "CMYK JPEG": 2 * CLASSES,
        "YCCK JPEG": CLASSES,
        "PNG image, not JPEG": 3 * CLASSES,
        "PNG image with alpha, not JPEG": CLASSES,
    }
    assert (manifest["label_base"], manifest["num_classes"]) == (1, CLASSES)
    train = manifest["splits"]["train"]
    # 11 quirk files per class plus README.txt; skipped: 3 per class plus README.txt
    assert (train["files_found"], train["images"], train["skipped"], train["reencoded"]) == (
        CLASSES * (TREE["train_per_class"] + 11) + 1,
        TRAIN_IMAGES,
        3 * CLASSES + 1,
        5 * CLASSES,
    )
    for split in manifest["splits"].values():
        assert split["images"] == split["files_found"] - split["skipped"]
    assert train["images_per_class"] == [TREE["train_per_class"] + 8] * CLASSES
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            data = (prepared / shard["file"]).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (shard["bytes"], shard["sha256"])
            assert shard["records"] == len(read_shard(prepared / shard["file"]))


def test_every_shard_mixes_classes(prepared):
    for shard in shards_of(prepared, "train"):
        labels = Counter(r["image/class/label"] for r in read_shard(shard))
        assert len(labels) == CLASSES, f"{shard.name} holds only classes {sorted(labels)}"
        assert max(labels.values()) < 0.5 * sum(labels.values())


def test_index_files_are_byte_identical_to_dali_tfrecord2idx(prepared, tmp_path):
    tool = shutil.which("tfrecord2idx", path=os.path.dirname(sys.executable))
    assert tool, "DALI's tfrecord2idx script is not installed next to this Python"
    for shard in shards_of(prepared, "train") + shards_of(prepared, "validation"):
        procs.run([tool, str(shard), str(tmp_path / "ref.idx")], check=True)
        assert (tmp_path / "ref.idx").read_bytes() == shard.with_name(shard.name + ".idx").read_bytes()


def test_same_seed_gives_identical_output_and_another_seed_another_order(quirky_tree, prepared, tmp_path):
    prepare(str(quirky_tree), str(tmp_path / "same"), train_shards=4, val_shards=3, workers=1, seed=7)
    assert tree_bytes(tmp_path / "same") == tree_bytes(prepared)
    prepare(str(quirky_tree), str(tmp_path / "other"), train_shards=4, val_shards=3, workers=1, seed=8)
    first = [r["image/filename"] for r in read_shard(shards_of(tmp_path / "other", "train")[0])]
    assert first != [r["image/filename"] for r in read_shard(shards_of(prepared, "train")[0])]


def test_rerun_on_finished_output_changes_nothing(quirky_tree, prepared):
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in prepared.iterdir()}
    proc = run_module(
        "data_prep.imagenet",
        "--src",
        str(quirky_tree),
        "--out",
        str(prepared),
        "--train-shards",
        "4",
        "--val-shards",
        "3",
        "--seed",
        "7",
        "--workers",
        "2",
        check=True,
    )
    assert "nothing to do" in proc.stdout
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in prepared.iterdir()} == before


def test_other_settings_into_the_same_output_are_refused(quirky_tree, prepared):
    with pytest.raises(PrepError, match=r"manifest.json: OUT was prepared with other settings \(seed\)"):
        prepare(str(quirky_tree), str(prepared), train_shards=4, val_shards=3, seed=8)


def test_too_many_shards_for_the_images_is_an_error(quirky_tree, tmp_path):
    with pytest.raises(PrepError, match=r"validation: 66 images cannot fill --val-shards 500; lower it"):
        prepare(str(quirky_tree), str(tmp_path / "out"), train_shards=4, val_shards=500)
    assert not (tmp_path / "out").exists()


def test_flat_val_with_kaggle_csv_and_resize(tmp_path):
    src = generate(
        str(tmp_path / "src"),
        classes=3,
        train_per_class=8,
        val_per_class=4,
        min_side=40,
        max_side=90,
        val_layout="flat",
        quirks=True,
    )
    out = tmp_path / "out"
    manifest = prepare(str(src), str(out), train_shards=2, val_shards=2, resize_shorter=48)
    assert manifest["settings"]["val_labels"] == str(src / "LOC_val_solution.csv")
    truth = dict(line.split(",")[0:2] for line in (src / "LOC_val_solution.csv").read_text().splitlines()[1:])
    records = all_records(out, "validation")
    assert len(records) == 3 * (4 + 3)
    for r in records:
        assert truth[r["image/filename"].decode().split(".")[0]].split()[0] == r["image/class/synset"].decode()
    for r in records + all_records(out, "train"):
        assert min(r["image/width"], r["image/height"]) <= 48
    resized = [e for e in manifest["reencoded"] if "to shorter side 48" in e["reason"]]
    assert resized
    assert all(e["reason"].startswith(("resized", "CMYK", "YCCK", "PNG")) for e in manifest["reencoded"])


def test_verify_full_passes_on_fresh_output(prepared):
    proc = run_module("data_prep.verify", str(prepared), "--full", check=True)
    assert proc.stdout.strip().endswith(f"7 shards, {TRAIN_IMAGES + VAL_IMAGES:,} records and images decoded: OK")


@pytest.mark.parametrize("count, parts", [(10, 3), (1_281_167, 1024), (50_000, 128), (7, 7)])
def test_balanced_slices_cover_everything_once_within_one(count, parts):
    sizes = [s.stop - s.start for s in balanced_slices(count, parts)]
    assert sum(sizes) == count
    assert max(sizes) - min(sizes) <= 1
    assert [s.start for s in balanced_slices(count, parts)][1:] == [s.stop for s in balanced_slices(count, parts)][:-1]
