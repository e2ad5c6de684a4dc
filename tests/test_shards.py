"""The shard directory as the reader sees it: series, indexes built where they can be, manifest and labels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.shards import DataError, build_index, default_index_cache, open_shards, shard_bounds
from tests import procs
from tests.pictures import jpeg
from tests.shardsets import write_manifest, write_shards

REPO = Path(__file__).resolve().parents[1]


def small_set(folder: Path, index: bool = False, train: int = 12, val: int = 5) -> Path:
    """Tiny third-party-style shards: 3 train, 2 validation, labels 1..4."""
    items = [(jpeg(np.full((30, 40, 3), 10 * k, np.uint8)), 1 + k % 4) for k in range(train)]
    write_shards(folder, "train", items, 3, index=index)
    write_shards(folder, "validation", items[:val], 2, index=index)
    return folder


def test_built_indexes_equal_dalis_tfrecord2idx(tmp_path):
    small_set(tmp_path, index=False)
    shard = tmp_path / "train-00001-of-00003"
    tool = Path(sys.executable).parent / "tfrecord2idx"
    procs.run([sys.executable, str(tool), str(shard), str(tmp_path / "dali.idx")], check=True, capture_output=True)
    shards = open_shards(tmp_path)
    assert (tmp_path / "train-00001-of-00003.idx").read_bytes() == (tmp_path / "dali.idx").read_bytes()
    assert shards.splits["train"].counts == (4, 4, 4)
    assert shards.splits["validation"].images == 5
    assert shards.splits["train"].indexes[1] == str(shard) + ".idx"


def test_an_existing_index_is_used_and_a_stale_one_refused(tmp_path):
    small_set(tmp_path, index=True)
    index = tmp_path / "validation-00000-of-00002.idx"
    before = index.stat().st_mtime_ns
    open_shards(tmp_path)
    assert index.stat().st_mtime_ns == before, "a matching index is not rewritten"
    index.write_text("0 100\n")
    with pytest.raises(DataError, match=r"validation-00000-of-00002.idx: does not match .* delete the .idx"):
        open_shards(tmp_path)


def test_damaged_or_foreign_files_are_named(tmp_path):
    small_set(tmp_path)
    shard = tmp_path / "train-00002-of-00003"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"train-00002-of-00003: record at offset \d+: truncated.*data_prep.verify"):
        open_shards(tmp_path)
    shard.write_bytes(b"not a tfrecord file at all")
    with pytest.raises(DataError, match="length CRC mismatch .not a TFRecord file"):
        open_shards(tmp_path)
    shard.write_bytes(b"")
    with pytest.raises(DataError, match="train-00002-of-00003: empty shard"):
        open_shards(tmp_path)


def test_a_missing_shard_of_a_series_is_an_error(tmp_path):
    small_set(tmp_path)
    (tmp_path / "train-00001-of-00003").unlink()
    with pytest.raises(DataError, match=r"train-00001-of-00003: missing \(1 shard\(s\)"):
        open_shards(tmp_path)


def test_manifest_sets_labels_and_must_agree(tmp_path):
    small_set(tmp_path, index=True)
    write_manifest(tmp_path, 4, {"train": 12, "validation": 5})
    (tmp_path / "labels.txt").write_text("n1\nn2\nn3\nn4\n")
    shards = open_shards(tmp_path)
    assert (shards.label_base, shards.num_classes, shards.class_names) == (1, 4, ("n1", "n2", "n3", "n4"))
    with pytest.raises(DataError, match="--num-classes 1000: .*manifest.json says 4 classes; drop the flag"):
        open_shards(tmp_path, num_classes=1000)
    (tmp_path / "labels.txt").write_text("n1\nn2\n")
    with pytest.raises(DataError, match="labels.txt: 2 names for 4 classes"):
        open_shards(tmp_path)
    (tmp_path / "labels.txt").unlink()
    write_manifest(tmp_path, 4, {"train": 13, "validation": 5})
    with pytest.raises(DataError, match="train shards hold 12 records, manifest.json says 13"):
        open_shards(tmp_path)


def test_shard_bounds_split_like_dali():
    # DALI gives shard i of k the samples [N*i//k, N*(i+1)//k); the validation tests check it against DALI.
    assert [shard_bounds(23, i, 2) for i in range(2)] == [(0, 11), (11, 23)]
    assert [shard_bounds(7, i, 3) for i in range(3)] == [(0, 2), (2, 4), (4, 7)]


def test_default_cache_is_per_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    a, b = default_index_cache(tmp_path / "a"), default_index_cache(tmp_path / "b")
    assert a != b
    assert a.parent == tmp_path / "cache" / "imagenet-pipeline" / "indexes"


def test_build_index_is_atomic_and_counts(tmp_path):
    small_set(tmp_path)
    count = build_index(tmp_path / "train-00000-of-00003", tmp_path / "x.idx")
    assert count == 4
    assert len((tmp_path / "x.idx").read_text().splitlines()) == 4
    assert not list(tmp_path.glob(".*.partial"))


READ_ONLY_CHILD = """
import sys
from pipeline.data import DataConfig, ImageNetData
data = ImageNetData(DataConfig(sys.argv[1], batch_size=2, crop_size=16, val_resize=16, data_device="cpu",
                               num_classes=4, index_dir=sys.argv[2] if len(sys.argv) > 2 else None))
print(sum(int((b.labels >= 0).sum()) for b in data.validation()), data.shards.splits["train"].indexes[0])
"""


def run_without_write_access(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """Run READ_ONLY_CHILD where `folder` cannot be written: a read-only bind mount in a private mount
    namespace when we are root (root ignores permissions), else after chmod."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(folder.parent / "cache")}
    child = [sys.executable, "-c", READ_ONLY_CHILD, str(folder), *args]
    if os.geteuid() == 0:
        script = 'mount --bind -o ro "$0" "$0" && exec "$@"'
        probe = procs.run(["unshare", "--mount", "sh", "-c", script, str(folder), "true"], capture_output=True)
        if probe.returncode != 0:
            pytest.skip(f"running as root without mount namespaces: {probe.stderr.decode().strip()}")
        return procs.run(
            ["unshare", "--mount", "sh", "-c", script, str(folder), *child],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    os.chmod(folder, 0o555)
    try:
        return procs.run(child, env=env, capture_output=True, text=True, timeout=300)
    finally:
        os.chmod(folder, 0o755)


@pytest.mark.slow
def test_a_read_only_data_folder_gets_its_indexes_in_the_cache(tmp_path, monkeypatch):
    data = small_set(tmp_path / "data")
    proc = run_without_write_access(data)
    assert proc.returncode == 0, proc.stderr
    count, first_index = proc.stdout.split()
    assert int(count) == 5
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # what the child was given
    assert Path(first_index).parent == default_index_cache(data)
    assert not list(data.glob("*.idx")), "nothing may be written beside read-only shards"
    assert len(list(Path(first_index).parent.glob("*.idx"))) == 5
    # An explicit --index-dir wins over the default cache.
    proc = run_without_write_access(data, str(tmp_path / "mine"))
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.split()[1]).parent == tmp_path / "mine"
