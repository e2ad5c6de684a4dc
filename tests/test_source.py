"""Source layouts, and the clear errors a broken source gets before any image is read."""

from pathlib import Path

import pytest
from PIL import Image

from data_prep.source import SourceError, scan
from data_prep.synthetic import jpeg_bytes
from tests.runs import run_module

JPEG = jpeg_bytes(Image.new("RGB", (8, 8), (10, 20, 30)), 90)


def make(root: Path, files: dict[str, bytes | str]) -> Path:
    """Create files (relative path -> content; a trailing '/' makes an empty folder)."""
    for rel, content in files.items():
        path = root / rel
        if rel.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


TRAIN = {"train/n02/a.JPEG": JPEG, "train/n01/b.jpg": JPEG, "train/n01/c.PNG": JPEG, "train/n01/d.jpeg": JPEG}


def test_class_folder_layout_sorted_wnids_and_any_case_extensions(tmp_path):
    src = make(tmp_path, {**TRAIN, "val/n01/v1.JPEG": JPEG, "val/n02/v2.JPEG": JPEG, "train/n01/notes.txt": "x"})
    source = scan(src)
    assert source.wnids == ["n01", "n02"]
    assert [f.path for f in source.files["train"]] == [
        "train/n01/b.jpg",
        "train/n01/c.PNG",
        "train/n01/d.jpeg",
        "train/n02/a.JPEG",
    ]
    validation = [(f.path, f.wnid) for f in source.files["validation"]]
    assert validation == [("val/n01/v1.JPEG", "n01"), ("val/n02/v2.JPEG", "n02")]
    assert source.ignored == [("train", "train/n01/notes.txt", "extension is not .jpeg/.jpg/.png (any case)")]


def test_flat_val_with_kaggle_csv_in_the_parent_folder(tmp_path):
    src = make(
        tmp_path / "imagenet",
        {**TRAIN, "val/ILSVRC2012_val_00000001.JPEG": JPEG, "val/ILSVRC2012_val_00000002.JPEG": JPEG},
    )
    make(
        tmp_path,
        {
            "LOC_val_solution.csv": "ImageId,PredictionString\n"
            "ILSVRC2012_val_00000002,n01 1 2 3 4 n01 5 6 7 8\nILSVRC2012_val_00000001,n02 1 2 3 4\n"
            "ILSVRC2012_val_00000003,n02 1 2 3 4\n"
        },
    )
    source = scan(src)
    assert [(f.path, f.wnid) for f in source.files["validation"]] == [
        ("val/ILSVRC2012_val_00000001.JPEG", "n02"),
        ("val/ILSVRC2012_val_00000002.JPEG", "n01"),
    ]
    assert source.val_labels == str(tmp_path / "LOC_val_solution.csv")
    assert source.labels_without_image == 1


def test_flat_val_with_a_labels_file(tmp_path):
    src = make(tmp_path / "src", {**TRAIN, "val/x.JPEG": JPEG, "val/y.jpg": JPEG})
    labels = make(tmp_path, {"labels.txt": "x.JPEG n02\ny n01\n"}) / "labels.txt"
    source = scan(src, labels)
    assert [(f.path, f.wnid) for f in source.files["validation"]] == [("val/x.JPEG", "n02"), ("val/y.jpg", "n01")]


@pytest.mark.parametrize(
    "files, labels, message",
    [
        ({"val/n01/a.JPEG": JPEG}, None, r"train: missing; expected train/<wnid>/<image>"),
        ({"train/": "", "val/n01/a.JPEG": JPEG}, None, r"train: empty; the train split needs images"),
        ({**TRAIN, "train/n03/readme.txt": "x", "val/n01/a.JPEG": JPEG}, None, r"train: class n03 has no"),
        (TRAIN, None, r"val: missing"),
        ({**TRAIN, "val/": ""}, None, r"val: empty; the validation split needs images"),
        ({**TRAIN, "val/n09/a.JPEG": JPEG}, None, r"val/n09: class n09 is not a class folder in train/"),
        ({**TRAIN, "val/a.JPEG": JPEG}, None, r"flat validation folder without labels; put LOC_val_solution.csv"),
        (
            {**TRAIN, "val/a.JPEG": JPEG, "val/b.JPEG": JPEG, "l.txt": "a n01\n"},
            "l.txt",
            r"l.txt: no label for 1 file\(s\) in .*val \(first: b.JPEG\)",
        ),
        ({**TRAIN, "val/a.JPEG": JPEG, "l.txt": "a n07\n"}, "l.txt", r"val/a.JPEG is labelled n07, which is not a"),
        ({**TRAIN, "val/a.JPEG": JPEG, "l.txt": "a n01 extra\n"}, "l.txt", r"l.txt:1: expected 'filename wnid'"),
        ({**TRAIN, "val/a.JPEG": JPEG, "val/n01/b.JPEG": JPEG}, None, r"mixes class folders and image files"),
        ({**TRAIN, "val/notes.txt": "x"}, None, r"val: no .JPEG/.jpg/.jpeg/.png images"),
        ({**TRAIN, "val/n01/a.JPEG": JPEG, "l.txt": "a n01\n"}, "l.txt", r"given, but .*val holds class folders"),
    ],
    ids=[
        "no-train",
        "empty-train",
        "empty-class",
        "no-val",
        "empty-val",
        "unknown-wnid",
        "flat-no-labels",
        "unlabelled-file",
        "label-unknown-wnid",
        "bad-label-line",
        "mixed-val",
        "val-without-images",
        "labels-for-folders",
    ],
)
def test_bad_sources_fail_before_any_work_with_the_path_named(tmp_path, files, labels, message):
    src = make(tmp_path / "src", files)
    with pytest.raises(SourceError, match=message):
        scan(src, src / labels if labels else None)


def test_cli_error_is_one_line_and_exit_status_2(tmp_path):
    src = make(tmp_path / "src", {**TRAIN, "val/n09/a.JPEG": JPEG})
    proc = run_module(
        "data_prep.imagenet",
        "--src",
        str(src),
        "--out",
        str(tmp_path / "out"),
        "--train-shards",
        "1",
        "--val-shards",
        "1",
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: ")
    assert "n09" in proc.stderr
    assert not (tmp_path / "out").exists()
