"""The built-in dataset: ImageNet layout, photo-like sizes, and classes a simple model can tell apart."""

import colorsys

import numpy as np
from PIL import Image

from data_prep.synthetic import generate, wnid
from tests.runs import run_module
from tests.shardsets import tree_bytes


def mean_hue(path) -> float:
    """Hue (0..1) of an image's mean colour."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=float).reshape(-1, 3).mean(axis=0) / 255
    return colorsys.rgb_to_hsv(*rgb)[0]


def test_layout_sizes_and_determinism(tmp_path):
    root = generate(str(tmp_path / "a"), classes=3, train_per_class=12, val_per_class=2, min_side=50, max_side=90)
    assert sorted(p.name for p in (root / "train").iterdir()) == [wnid(0), wnid(1), wnid(2)]
    sizes = [Image.open(p).size for p in (root / "train").rglob("*.JPEG")]
    assert len(sizes) == 36
    assert all(50 <= min(s) <= 90 for s in sizes)
    assert len({round(w / h, 1) for w, h in sizes}) >= 3, "aspect ratios should vary like photos"
    assert len(list((root / "val").rglob("ILSVRC2012_val_*.JPEG"))) == 6
    again = generate(str(tmp_path / "b"), classes=3, train_per_class=12, val_per_class=2, min_side=50, max_side=90)
    assert tree_bytes(root) == tree_bytes(again)


def test_classes_differ_visibly_by_hue(tmp_path):
    classes = 10
    root = generate(str(tmp_path / "d"), classes=classes, train_per_class=1, val_per_class=10, min_side=48, max_side=96)
    hues = np.arange(classes) / classes
    correct = total = 0
    for k in range(classes):
        for p in (root / "val" / wnid(k)).iterdir():
            distance = np.abs((hues - mean_hue(p) + 0.5) % 1.0 - 0.5)  # around the colour circle
            correct += int(np.argmin(distance) == k)
            total += 1
    assert correct / total >= 0.95, f"nearest-hue accuracy {correct / total:.2f}; chance is 0.1"


def test_cli_flat_layout_writes_kaggle_csv(tmp_path):
    proc = run_module(
        "data_prep.synthetic",
        "--out",
        str(tmp_path / "s"),
        "--classes",
        "2",
        "--train-per-class",
        "3",
        "--val-per-class",
        "2",
        "--val-layout",
        "flat",
        check=True,
    )
    assert "wrote" in proc.stdout
    rows = (tmp_path / "s" / "LOC_val_solution.csv").read_text().splitlines()
    assert rows[0] == "ImageId,PredictionString"
    assert rows[1:] == [f"ILSVRC2012_val_0000000{i + 1},{wnid(i // 2)} 1 1 10 10" for i in range(4)]
    assert sorted(p.name for p in (tmp_path / "s" / "val").iterdir()) == [
        f"ILSVRC2012_val_0000000{i}.JPEG" for i in range(1, 5)
    ]


def orientation(path) -> float:
    """Share of an image's gradient energy across its columns: near 1 for vertical stripes, near 0 for horizontal."""
    a = np.asarray(Image.open(path).convert("L"), dtype=float)
    gx, gy = np.abs(np.diff(a, axis=1)).mean(), np.abs(np.diff(a, axis=0)).mean()
    return gx / (gx + gy)


def test_the_fine_mode_tells_classes_by_texture_not_hue(tmp_path):
    """--fine: the hue says nothing of the class (a mean-hue guess is near chance), while two classes of one shape
    differ in their texture's orientation (classes 0 and 4: gratings at 0 and 90 degrees)."""
    classes = 8
    root = generate(str(tmp_path / "f"), classes=classes, train_per_class=1, val_per_class=6, min_side=128,
                    max_side=160, fine=True)  # fmt: skip
    hues = {k: [mean_hue(p) for p in (root / "val" / wnid(k)).iterdir()] for k in range(classes)}
    centres = {k: np.mean(h) for k, h in hues.items()}
    guessed = sum(
        int(min(centres, key=lambda c: abs((centres[c] - h + 0.5) % 1.0 - 0.5)) == k)
        for k, hs in hues.items()
        for h in hs
    )
    assert guessed / (6 * classes) < 0.5
    vertical = [orientation(p) for p in (root / "val" / wnid(0)).iterdir()]
    horizontal = [orientation(p) for p in (root / "val" / wnid(4)).iterdir()]
    assert min(vertical) > 0.6 > 0.4 > max(horizontal)
    assert run_module("data_prep.synthetic", "--out", str(tmp_path / "g"), "--fine", "--classes", "33").returncode == 2
