"""Preparing straight from the downloads (image-net.org's tars and devkit, Kaggle's zip), against the extracted
folders, and the one line each damaged archive gets."""

import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from scipy.io import loadmat

from data_prep import archives, pack
from data_prep.archives import DEVKIT, GROUND_TRUTH, KAGGLE_ZIP, META, TRAIN_TAR, VAL_TAR, ArchiveError
from data_prep.imagenet import Item, PrepError, _in_disk_order_groups, prepare
from data_prep.source import SourceError, SourceFile, scan
from tests.runs import run_module
from tests.shardsets import tree_bytes

SHARDS = dict(train_shards=3, val_shards=2, seed=5)
# What may differ between the manifests of one set of images read from its downloads and from its folders.
SOURCE_DESCRIPTION = ("source", "source_kind")
SETTINGS_DESCRIPTION = ("source", "val_labels")


@pytest.fixture(scope="session")
def downloads(quirky_tree, tmp_path_factory) -> Path:
    """image-net.org's three files of the quirky tree."""
    return pack.official(quirky_tree, tmp_path_factory.mktemp("downloads"), seed=1)


@pytest.fixture(scope="session")
def true_labels(quirky_tree, tmp_path_factory) -> Path:
    """'filename wnid' lines from the tree's own val/<wnid>/ folders: the oracle for the devkit's labels."""
    path = tmp_path_factory.mktemp("labels") / "val-labels.txt"
    path.write_text("".join(f"{f.name} {f.parent.name}\n" for f in sorted((quirky_tree / "val").glob("*/*"))))
    return path


def extract_official(downloads: Path, out: Path) -> Path:
    """The downloads extracted as users' scripts do: train/<wnid>/ from each inner tar, a flat val/."""
    with tarfile.open(downloads / TRAIN_TAR) as outer:
        for member in outer:
            with tarfile.open(fileobj=outer.extractfile(member)) as inner:
                inner.extractall(out / "train" / member.name.removesuffix(".tar"), filter="data")
    with tarfile.open(downloads / VAL_TAR) as val:
        val.extractall(out / "val", filter="data")
    return out


def same_output(a: Path, b: Path) -> None:
    """Two prepared folders hold the same bytes, and manifests that differ only in where the images came from."""
    files = {name: data for name, data in tree_bytes(a).items() if name != "manifest.json"}
    assert files == {name: data for name, data in tree_bytes(b).items() if name != "manifest.json"}
    assert any(name.startswith("train-") for name in files) and "labels.txt" in files
    manifests = [json.loads((folder / "manifest.json").read_text()) for folder in (a, b)]
    for manifest in manifests:
        for key in SOURCE_DESCRIPTION:
            manifest.pop(key)
        for key in SETTINGS_DESCRIPTION:
            manifest["settings"].pop(key)
    assert manifests[0] == manifests[1]


def test_the_downloads_give_the_extracted_folders_shards_byte_for_byte(downloads, true_labels, tmp_path):
    """Same seed, same shards, indexes, labels.txt and manifest (skips and re-encodes of the quirks included); the
    archives' labels come from meta.mat, whose ids do not follow the sorted wnids."""
    ids = pack.synset_ids(sorted(p.name for p in (extract_official(downloads, tmp_path / "x") / "train").iterdir()), 1)
    assert list(ids.values()) != sorted(ids.values())
    manifest = prepare(str(downloads), str(tmp_path / "from-archives"), workers=2, **SHARDS)
    prepare(str(tmp_path / "x"), str(tmp_path / "from-folders"), val_labels=str(true_labels), **SHARDS)
    same_output(tmp_path / "from-archives", tmp_path / "from-folders")
    assert manifest["source_kind"] == "image-net.org archives" and manifest["skipped"] and manifest["reencoded"]
    assert not (tmp_path / "from-archives" / ".prep").exists()


def test_kaggles_zip_gives_its_extracted_folders_shards(quirky_tree, true_labels, tmp_path):
    """Read in place (stored and deflated members), Kaggle's zip gives what its extracted CLS-LOC folder gives."""
    pack.kaggle(quirky_tree, tmp_path / "kaggle")
    with zipfile.ZipFile(tmp_path / "kaggle" / KAGGLE_ZIP) as z:
        z.extractall(tmp_path / "x")
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}
    manifest = prepare(str(tmp_path / "kaggle"), str(tmp_path / "from-zip"), workers=2, **SHARDS)
    folder = tmp_path / "x" / "ILSVRC" / "Data" / "CLS-LOC"
    prepare(str(folder), str(tmp_path / "from-folders"), val_labels=str(tmp_path / "x" / "LOC_val_solution.csv"),
            **SHARDS)  # fmt: skip
    same_output(tmp_path / "from-zip", tmp_path / "from-folders")
    assert manifest["source_kind"] == "Kaggle zip"


def test_meta_mat_in_the_real_struct_layout_gives_the_leaves_only(tmp_path):
    """The devkit's classes are the synsets without children, keyed by their ILSVRC2012_ID, read from a struct array
    laid out as image-net.org's (checked here with scipy's own reader, field by field)."""
    ids = pack.synset_ids([f"n0{k:07d}" for k in range(7)], seed=2)
    meta = pack.meta_mat(ids, parents=3)
    synsets = loadmat(io.BytesIO(meta))["synsets"]
    assert synsets.shape == (10, 1) and synsets.dtype.names == pack.SYNSET_FIELDS
    assert synsets[8, 0]["num_children"].item() > 0 and synsets[8, 0]["children"].size > 0
    (tmp_path / DEVKIT).write_bytes(pack.devkit_bytes(meta, [3, 1]))
    devkit = archives.read_devkit(tmp_path / DEVKIT)
    assert devkit.classes == {i: w for w, i in ids.items()} and devkit.ground_truth == [3, 1]


def test_the_index_is_kept_and_a_killed_scan_goes_on_where_it_stopped(downloads, tmp_path, monkeypatch):
    index = tmp_path / "train.jsonl"
    whole = archives.index_tar(downloads / TRAIN_TAR, index, nested=True)
    lines = index.read_text().splitlines(keepends=True)
    assert len(lines) == 1 + len(whole) + 1  # the header, one line per inner tar, the end
    index.write_text("".join(lines[:3]) + lines[3][:40])  # killed while journaling the third inner tar
    scanned = []
    inner_members = archives._inner_members
    monkeypatch.setattr(
        archives, "_inner_members", lambda p, g, info: scanned.append(info.name) or inner_members(p, g, info)
    )
    assert archives.index_tar(downloads / TRAIN_TAR, index, nested=True) == whole
    assert scanned == sorted(whole)[2:]

    def no_scan(*args):
        raise AssertionError("rescanned a finished index")

    monkeypatch.setattr(archives, "_scan", no_scan)
    assert archives.index_tar(downloads / TRAIN_TAR, index, nested=True) == whole


def test_a_killed_prep_resumes_from_its_index_under_out(downloads, true_labels, tmp_path, monkeypatch):
    import data_prep.imagenet as imagenet

    def killed(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(imagenet, "_check_split", killed)
        with pytest.raises(KeyboardInterrupt):
            prepare(str(downloads), str(tmp_path / "out"), **SHARDS)
    assert sorted(p.name for p in (tmp_path / "out" / ".prep" / "index").iterdir()) == ["train.jsonl", "val.jsonl"]
    monkeypatch.setattr(archives, "_scan", lambda *args: pytest.fail("rescanned the archives"))
    prepare(str(downloads), str(tmp_path / "out"), **SHARDS)
    prepare(str(extract_official(downloads, tmp_path / "x")), str(tmp_path / "ref"), val_labels=str(true_labels),
            **SHARDS)  # fmt: skip
    same_output(tmp_path / "out", tmp_path / "ref")


def test_the_write_pass_reads_each_group_in_disk_order_and_writes_the_shuffled_order(monkeypatch):
    import data_prep.imagenet as imagenet

    read = []

    class Recorder:
        def read(self, f: SourceFile) -> bytes:
            read.append(f.member.offset)
            return bytes(f.member.size)

    offsets = [70, 10, 50, 30, 60, 20, 40]
    items = [Item(SourceFile(f"train/n/{o}", "n", archives.Member("a.tar", o, 3)), 1, None) for o in offsets]
    items = [Item(i.file, 1, imagenet.FileCheck("store", "", 1, 1, 3, 3)) for i in items]
    monkeypatch.setattr(imagenet, "READ_GROUP_BYTES", 9)  # three images a group
    assert [item for item, _ in _in_disk_order_groups(Recorder(), items)] == items
    assert read == [10, 50, 70, 20, 30, 60, 40]


# ---------------------------------------------------------------- damaged downloads


def official_files(downloads: Path, folder: Path) -> Path:
    """A copy of the three downloads to damage."""
    shutil.copytree(downloads, folder)
    return folder


def rewrite_train_tar(folder: Path, change) -> None:
    """Rebuild the train tar with change(list of (inner tar name, bytes)) applied."""
    with tarfile.open(folder / TRAIN_TAR) as outer:
        inner = [(m.name, outer.extractfile(m).read()) for m in outer]
    (folder / TRAIN_TAR).write_bytes(pack.tar_bytes(change(inner)))


def rewrite_devkit(folder: Path, meta: bytes | None, truth: list[int] | None) -> None:
    """A devkit with this meta.mat and ground truth (None leaves it out)."""
    (folder / DEVKIT).write_bytes(pack.devkit_bytes(meta, truth))


def devkit_parts(folder: Path) -> tuple[bytes, list[int]]:
    """meta.mat's bytes and the ground truth of a devkit."""
    with tarfile.open(folder / DEVKIT) as tar:
        meta = tar.extractfile(pack.DEVKIT_TOP + META).read()
        truth = [int(x) for x in tar.extractfile(pack.DEVKIT_TOP + GROUND_TRUTH).read().split()]
    return meta, truth


def cut(path: Path, at: int) -> None:
    """Keep the first `at` bytes of a file."""
    path.write_bytes(path.read_bytes()[:at])


def first_inner(folder: Path) -> tarfile.TarInfo:
    with tarfile.open(folder / TRAIN_TAR) as outer:
        return outer.getmembers()[0]


def damage(case: str, folder: Path) -> str:
    """Damage the downloads in `folder` as `case` says; return the message expected."""
    if case == "outer-cut-inside-an-inner-tar":
        inner = first_inner(folder)
        cut(folder / TRAIN_TAR, inner.offset_data + inner.size // 2)
        return rf"{TRAIN_TAR}: truncated: {inner.name} at byte {inner.offset_data} needs {inner.size} bytes"
    if case == "outer-cut-between-members":
        inner = first_inner(folder)
        end = inner.offset_data + -(-inner.size // 512) * 512
        cut(folder / TRAIN_TAR, end)
        return rf"{TRAIN_TAR}: truncated or damaged at byte {end}: the archive has neither"
    if case == "inner-tar-cut":
        rewrite_train_tar(folder, lambda inner: [(inner[0][0], inner[0][1][:1500]), *inner[1:]])
        return rf"{TRAIN_TAR}: truncated: \S+ at byte \d+ needs \d+ bytes, but inner tar n\d+.tar ends at byte \d+"
    if case == "val-tar-cut":
        cut(folder / VAL_TAR, (folder / VAL_TAR).stat().st_size // 2)
        return rf"{VAL_TAR}: truncated"
    if case == "devkit-without-meta":
        rewrite_devkit(folder, None, devkit_parts(folder)[1])
        return rf"{DEVKIT}: has no data/meta.mat"
    if case == "devkit-without-ground-truth":
        rewrite_devkit(folder, devkit_parts(folder)[0], None)
        return rf"{DEVKIT}: has no {GROUND_TRUTH}"
    if case == "devkit-not-gzip":
        cut(folder / DEVKIT, 100)
        return rf"{DEVKIT}: not a readable tar.gz"
    if case == "ground-truth-one-line-short":
        meta, truth = devkit_parts(folder)
        rewrite_devkit(folder, meta, truth[:-1])
        return rf"{GROUND_TRUTH} has {len(truth) - 1} lines for {len(truth)} images in {VAL_TAR}"
    if case == "inner-tar-not-in-meta":
        rewrite_train_tar(folder, lambda inner: [*inner, ("n99999999.tar", inner[0][1])])
        return rf"{TRAIN_TAR}: n99999999.tar is not a class in {DEVKIT}'s meta.mat"
    if case == "image-twice-in-an-inner-tar":
        with tarfile.open(fileobj=io.BytesIO(first_inner_bytes(folder))) as t:
            files = [(m.name, t.extractfile(m).read()) for m in t]
        twice = pack.tar_bytes([*files, files[0]])
        rewrite_train_tar(folder, lambda inner: [(inner[0][0], twice), *inner[1:]])
        return rf"{files[0][0]} appears twice in inner tar n\d+.tar \(bytes \d+ and \d+\)"
    if case == "image-twice-in-the-val-tar":
        with tarfile.open(folder / VAL_TAR) as t:
            files = [(m.name, t.extractfile(m).read()) for m in t]
        (folder / VAL_TAR).write_bytes(pack.tar_bytes([*files, files[3]]))
        return rf"{files[3][0]} appears twice in {VAL_TAR}"
    if case == "folder-inside-the-val-tar":
        with tarfile.open(folder / VAL_TAR) as t:
            files = [(m.name, t.extractfile(m).read()) for m in t]
        (folder / VAL_TAR).write_bytes(pack.tar_bytes([*files, ("n01/x.JPEG", files[0][1])]))
        return rf"{VAL_TAR}: holds folders \(n01/\); expected the flat validation folder"
    if case == "one-download-missing":
        (folder / VAL_TAR).unlink()
        return rf"not {VAL_TAR}; download it beside them"
    if case == "archives-beside-extracted-folders":
        (folder / "train").mkdir()
        return rf"holds both {TRAIN_TAR}, {VAL_TAR}, {DEVKIT} and train/"
    raise AssertionError(case)


def first_inner_bytes(folder: Path) -> bytes:
    with tarfile.open(folder / TRAIN_TAR) as outer:
        return outer.extractfile(outer.getmembers()[0]).read()


DAMAGE = [
    "outer-cut-inside-an-inner-tar",
    "outer-cut-between-members",
    "inner-tar-cut",
    "val-tar-cut",
    "devkit-without-meta",
    "devkit-without-ground-truth",
    "devkit-not-gzip",
    "ground-truth-one-line-short",
    "inner-tar-not-in-meta",
    "image-twice-in-an-inner-tar",
    "image-twice-in-the-val-tar",
    "folder-inside-the-val-tar",
    "one-download-missing",
    "archives-beside-extracted-folders",
]


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_download_is_refused_in_one_line_naming_it(case, downloads, tmp_path):
    folder = official_files(downloads, tmp_path / "src")
    message = damage(case, folder)
    with pytest.raises((SourceError, ArchiveError)) as refused:
        scan(folder, index_dir=tmp_path / "index")
    assert "\n" not in str(refused.value)
    assert refused.match(message), str(refused.value)


def test_the_cli_says_a_damaged_archive_in_one_line_and_exits_2(downloads, tmp_path):
    folder = official_files(downloads, tmp_path / "src")
    damage("outer-cut-inside-an-inner-tar", folder)
    proc = run_module("data_prep.imagenet", "--src", str(folder), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {folder / TRAIN_TAR}: truncated: ") and "download" in last


def test_a_zip_member_that_fails_its_crc_is_skipped_and_listed(quirky_tree, tmp_path):
    pack.kaggle(quirky_tree, tmp_path / "kaggle")
    path = tmp_path / "kaggle" / KAGGLE_ZIP
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.compress_type == zipfile.ZIP_STORED and i.filename.endswith("_0.JPEG"))
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    manifest = prepare(str(tmp_path / "kaggle"), str(tmp_path / "out"), **SHARDS)
    name = info.filename.removeprefix(archives.KAGGLE_DATA)
    assert {
        "split": "train",
        "file": name,
        "reason": "unreadable: CRC-32 mismatch at byte " + str(info.header_offset),
    } in (manifest["skipped"])


def test_preparing_twice_from_the_same_downloads_is_refused_only_for_other_settings(downloads, tmp_path):
    prepare(str(downloads), str(tmp_path / "out"), **SHARDS)
    before = tree_bytes(tmp_path / "out")
    prepare(str(downloads), str(tmp_path / "out"), **SHARDS)
    assert tree_bytes(tmp_path / "out") == before and not (tmp_path / "out" / ".prep").exists()
    with pytest.raises(PrepError, match="other settings"):
        prepare(str(downloads), str(tmp_path / "out"), **{**SHARDS, "seed": 6})


def test_val_labels_beside_archives_is_refused(downloads, tmp_path):
    with pytest.raises(SourceError, match="the archives carry their own validation labels"):
        scan(downloads, downloads / DEVKIT, index_dir=tmp_path)


def test_synthetic_pack_writes_the_three_downloads(tmp_path):
    sizes = ["--classes", "3", "--train-per-class", "2", "--val-per-class", "2", "--min-side", "16", "--max-side", "24"]
    proc = run_module("data_prep.synthetic", "--out", str(tmp_path / "d"), *sizes, "--pack", "official", check=True)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted(archives.OFFICIAL), proc.stdout
    source = scan(tmp_path / "d", index_dir=tmp_path / "index")
    assert len(source.files["train"]) == 6 and len(source.files["validation"]) == 6
    assert np.unique([f.wnid for f in source.files["validation"]]).size == 3


def test_members_named_from_dot_as_tar_c_dot_writes_them_are_the_same_images(downloads, tmp_path):
    """`tar cf n01.tar .` names members ./n01_1.JPEG; extraction puts them where n01_1.JPEG goes, and so does prep."""
    folder = official_files(downloads, tmp_path / "src")

    def from_dot(inner):
        dotted = []
        for name, data in inner:
            with tarfile.open(fileobj=io.BytesIO(data)) as t:
                dotted.append((name, pack.tar_bytes([("./" + m.name, t.extractfile(m).read()) for m in t])))
        return dotted

    rewrite_train_tar(folder, from_dot)
    paths = [f.path for f in scan(folder, index_dir=tmp_path / "i1").files["train"]]
    assert paths == [f.path for f in scan(downloads, index_dir=tmp_path / "i2").files["train"]]


def test_the_check_pass_reads_each_split_in_the_archives_order(downloads, tmp_path, monkeypatch):
    """Its chunks follow the offsets through each tar (the inner tars here list their images in reverse name
    order), not the shuffle nor the names."""
    import data_prep.imagenet as imagenet

    offsets: dict[str, list[int]] = {}
    check_chunk = imagenet.check_chunk

    def recording(task):
        for f in task[1]:
            offsets.setdefault(f.path.split("/")[0], []).append(f.member.offset)
        return check_chunk(task)

    monkeypatch.setattr(imagenet, "check_chunk", recording)
    monkeypatch.setattr(imagenet, "CHECK_CHUNK", 16)
    prepare(str(downloads), str(tmp_path / "out"), workers=1, **SHARDS)
    assert set(offsets) == {"train", "val"} and len(offsets["train"]) > 100
    assert all(sorted(o) == o for o in offsets.values())
