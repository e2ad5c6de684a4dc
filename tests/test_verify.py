"""data_prep.verify finds every kind of damage and names the shard and byte offset."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from data_prep.verify import verify
from pipeline.format import example, tfrecord
from tests.runs import run_module

SHARD = "train-00001-of-00004"


@pytest.fixture
def copy(prepared, tmp_path) -> Path:
    """A private copy of the prepared shards to damage."""
    return Path(shutil.copytree(prepared, tmp_path / "shards"))


def offsets(folder: Path, shard: str) -> list[tuple[int, int]]:
    """(offset, size) of each record, from the shard's index."""
    return [tuple(map(int, line.split())) for line in (folder / f"{shard}.idx").read_text().splitlines()]


def flip(path: Path, position: int) -> None:
    """Flip one bit of a file in place."""
    data = bytearray(path.read_bytes())
    data[position] ^= 0x10
    path.write_bytes(bytes(data))


def problems_of(folder: Path, *flags: str) -> tuple[int, list[str]]:
    """Exit status and problem lines of the verify command."""
    proc = run_module("data_prep.verify", str(folder), *flags)
    return proc.returncode, proc.stdout.splitlines()[:-1]


def test_clean_output_verifies(prepared):
    assert verify(str(prepared))[0] == []


def test_flipped_payload_byte_is_named_with_shard_and_record_offset(copy):
    offset, size = offsets(copy, SHARD)[3]
    flip(copy / SHARD, offset + size // 2)
    status, lines = problems_of(copy)
    assert status == 1
    assert lines == [f"{copy / SHARD}: record at offset {offset}: data CRC mismatch (record payload is corrupt)"]


def test_flipped_length_byte(copy):
    offset, _ = offsets(copy, SHARD)[2]
    flip(copy / SHARD, offset + 1)
    assert problems_of(copy)[1] == [
        f"{copy / SHARD}: record at offset {offset}: length CRC mismatch (record header is corrupt)"
    ]


def test_truncated_shard(copy):
    offset, size = offsets(copy, SHARD)[-1]
    (copy / SHARD).write_bytes((copy / SHARD).read_bytes()[: offset + size - 10])
    status, lines = problems_of(copy)
    assert status == 1
    assert len(lines) == 1
    assert lines[0].startswith(f"{copy / SHARD}: record at offset {offset}: truncated")


def test_index_that_does_not_match_its_shard(copy):
    index = copy / f"{SHARD}.idx"
    offset, size = offsets(copy, SHARD)[4]
    lines = index.read_text().splitlines()
    lines[4] = f"{offset + 1} {size}"
    index.write_text("\n".join(lines) + "\n")
    assert problems_of(copy) == (
        1,
        [
            f"{index}: line 5 is '{offset + 1} {size}' but the record at offset {offset} needs '{offset} {size}'; "
            "rebuild it with tfrecord2idx"
        ],
    )


def test_swapped_records_keep_crcs_but_fail_the_manifest_checksum(copy):
    path = copy / SHARD
    data = path.read_bytes()
    (a, sa), (b, sb) = offsets(copy, SHARD)[:2]
    path.write_bytes(data[b : b + sb] + data[a : a + sa] + data[b + sb :])
    status, lines = problems_of(copy)
    assert status == 1
    assert any(line.startswith(f"{path}: sha256 is ") and "manifest.json says" in line for line in lines)
    assert any(line.startswith(f"{path}.idx: line 1 is ") for line in lines)


def test_missing_shard_and_missing_index(copy):
    (copy / "validation-00002-of-00003").unlink()
    (copy / f"{SHARD}.idx").unlink()
    status, lines = problems_of(copy)
    assert status == 1
    assert f"{copy / 'validation-00002-of-00003'}: missing from the series" in lines
    assert f"{copy / 'validation-00002-of-00003'}: listed in manifest.json but missing" in lines
    assert f"{copy / SHARD}.idx: missing; DALI needs it (rebuild with tfrecord2idx)" in lines


def rewrite_shard(folder: Path, name: str, change) -> None:
    """Re-frame a shard with one record's features changed (valid CRCs), updating the manifest to match."""
    path = folder / name
    with open(path, "rb") as f:
        records = [example.decode(r.data) for r in tfrecord.read_records(f, name)]
    change(records[0])
    data = b"".join(tfrecord.frame(example.encode({k: v[0] for k, v in r.items()})) for r in records)
    path.write_bytes(data)
    offset, index = 0, []
    for r in records:
        size = len(tfrecord.frame(example.encode({k: v[0] for k, v in r.items()})))
        index.append(tfrecord.index_line(offset, size))
        offset += size
    (folder / f"{name}.idx").write_text("".join(index))
    manifest = json.loads((folder / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            if shard["file"] == name:
                shard.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_label_outside_the_manifest_range(copy):
    rewrite_shard(copy, SHARD, lambda r: r.update({example.LABEL: [99]}))
    assert problems_of(copy)[1] == [f"{copy / SHARD}: label 99 outside 1..6"]


def test_full_decode_catches_a_corrupt_jpeg_inside_a_valid_record(copy):
    rewrite_shard(copy, SHARD, lambda r: r.update({example.ENCODED: [r[example.ENCODED][0][:-700]]}))
    assert problems_of(copy) == (0, [])
    status, lines = problems_of(copy, "--full")
    assert status == 1
    assert len(lines) == 1
    assert lines[0].startswith(f"{copy / SHARD}: record at offset 0: image does not decode (undecodable: ")


def test_full_decode_catches_a_wrong_recorded_size(copy):
    rewrite_shard(copy, SHARD, lambda r: r.update({example.HEIGHT: [r[example.HEIGHT][0] + 1]}))
    assert problems_of(copy) == (0, [])
    status, lines = problems_of(copy, "--full")
    assert status == 1
    assert len(lines) == 1
    assert lines[0].startswith(f"{copy / SHARD}: record at offset 0: image is ")
    width, height = lines[0].split("image is ")[1].split(",")[0].split("x")
    assert lines[0].endswith(f"record says {width}x{int(height) + 1}")


def test_third_party_shards_without_index_or_manifest(copy):
    for extra in list(copy.glob("*.idx")) + [copy / "manifest.json", copy / "labels.txt"]:
        extra.unlink()
    proc = run_module("data_prep.verify", str(copy), "--full")
    assert proc.returncode == 0
    assert "note: 7 shard(s) have no .idx file" in proc.stdout
    assert proc.stdout.splitlines()[-1].endswith("records and images decoded: OK")


def test_folder_without_shards_is_an_error(tmp_path):
    proc = run_module("data_prep.verify", str(tmp_path))
    assert proc.returncode == 1
    assert f"{tmp_path}: no shards named like train-00000-of-01024" in proc.stdout
