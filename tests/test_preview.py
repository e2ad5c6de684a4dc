"""`python -m pipeline.data.preview` and `python -m pipeline.data.shards` (indexes), run as a user runs them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from pipeline.data.preview import CAPTION
from tests.pictures import colour_of, jpeg, reference_val, smooth
from tests.runs import run_module
from tests.shardsets import labelled_set, write_shards


@pytest.mark.slow
def test_validation_preview_shows_the_first_samples_in_shard_order(tmp_path):
    data = labelled_set(tmp_path / "data")
    out, npz = tmp_path / "grid.png", tmp_path / "samples.npz"
    args = ["--data-dir", str(data), "--split", "validation", "--num", "7", "--out", str(out)]
    proc = run_module("pipeline.data.preview", *args, "--save-npz", str(npz), "--crop-size", "32", "--val-resize", "40")
    assert proc.returncode == 0, proc.stderr
    saved = np.load(npz)
    assert saved["images"].shape == (7, 32, 32, 3)
    assert saved["images"].dtype == np.uint8
    assert saved["labels"].tolist() == list(range(7))
    for image, label in zip(saved["images"].astype(int), saved["labels"], strict=True):
        assert np.abs(image - colour_of(int(label))).max() <= 6
    columns = math.ceil(math.sqrt(7))
    assert Image.open(out).size == (columns * 32, math.ceil(7 / columns) * (32 + CAPTION))


@pytest.mark.slow
def test_validation_preview_pixels_are_the_reference_center_crops(tmp_path):
    images = [(jpeg(smooth(w, h, seed=w), quality=97), 1) for w, h in [(120, 90), (90, 140), (300, 200)]]
    write_shards(tmp_path, "validation", images, 2)
    npz = tmp_path / "v.npz"
    args = [
        "--data-dir",
        str(tmp_path),
        "--split",
        "validation",
        "--num",
        "3",
        "--out",
        str(tmp_path / "g.png"),
    ]
    proc = run_module(
        "pipeline.data.preview",
        *args,
        "--save-npz",
        str(npz),
        "--crop-size",
        "64",
        "--val-resize",
        "72",
        "--num-classes",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    for got, (encoded, _) in zip(np.load(npz)["images"], images, strict=True):
        assert np.abs(got.astype(int) - reference_val(encoded, 72, 64)).max() <= 2


@pytest.mark.slow
def test_train_preview_and_bad_input(tmp_path):
    data = labelled_set(tmp_path / "data")
    npz = tmp_path / "t.npz"
    args = ["--data-dir", str(data), "--num", "10", "--out", str(tmp_path / "t.png"), "--save-npz", str(npz)]
    proc = run_module("pipeline.data.preview", *args, "--crop-size", "32", "--val-resize", "40")
    assert proc.returncode == 0, proc.stderr
    labels = np.load(npz)["labels"]
    assert len(set(labels.tolist())) == 10, "ten different training samples"
    assert labels.max() < 45, "ten different training samples"
    bad = run_module("pipeline.data.preview", "--data-dir", str(tmp_path / "none"), "--out", "x.png")
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1
    assert "no such directory" in bad.stderr


def test_index_command_builds_and_counts(tmp_path):
    items = [(jpeg(np.zeros((20, 20, 3), np.uint8)), 1)] * 7
    write_shards(tmp_path, "train", items, 2, index=False)
    write_shards(tmp_path, "validation", items[:3], 1, index=False)
    proc = run_module("pipeline.data.shards", "--data-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "train: 2 shards, 7 records" in proc.stdout
    assert "validation: 1 shards, 3 records" in proc.stdout
    assert len(list(tmp_path.glob("*.idx"))) == 3
