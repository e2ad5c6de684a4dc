"""Re-read one shard against the format: framing and both CRCs, each record a tf.train.Example with an image and a
label, the DALI index beside it, and with `full` every image decoded. Used by data_prep.verify, and by training to
find the record DALI could not read."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import DecodeError
from PIL import Image

from pipeline.format import example, tfrecord
from pipeline.format.layout import index_path


def decoded_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an image decoded in full; raises what Pillow raises on data that does not decode. Large
    images are allowed without changing Pillow's global limit (Pillow warns past 89 Mpx, refuses past 179 Mpx)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.size


@dataclass
class ShardReport:
    """What re-reading one shard found."""

    path: str
    records: int = 0
    bytes: int = 0
    sha256: str = ""
    labels: set = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    has_index: bool = True


def _check_example(data: bytes, offset: int, name: str, full: bool, report: ShardReport) -> None:
    """Parse one record's Example; with `full`, decode its image and compare the stored size."""
    try:
        features = example.decode(data)
    except DecodeError:
        report.problems.append(f"{name}: record at offset {offset}: payload is not a tf.train.Example")
        return
    encoded, label = features.get(example.ENCODED), features.get(example.LABEL)
    if not encoded or not label:
        report.problems.append(f"{name}: record at offset {offset}: Example lacks {example.ENCODED} or {example.LABEL}")
        return
    report.labels.add(label[0])
    if not full:
        return
    recorded = (features.get(example.WIDTH, [None])[0], features.get(example.HEIGHT, [None])[0])
    try:
        size = decoded_size(encoded[0])
    except Image.UnidentifiedImageError:
        report.problems.append(f"{name}: record at offset {offset}: image does not decode (not an image)")
        return
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        report.problems.append(f"{name}: record at offset {offset}: image does not decode (undecodable: {e})")
        return
    if None not in recorded and recorded != size:
        report.problems.append(
            f"{name}: record at offset {offset}: image is {size[0]}x{size[1]}, record says {recorded[0]}x{recorded[1]}"
        )


def _check_index(path: Path, expected: str, report: ShardReport) -> None:
    """Compare a shard's .idx with the index its records imply, naming the first wrong entry."""
    index = index_path(path)
    if not index.is_file():
        report.has_index = False
        return
    got, want = index.read_text().splitlines(), expected.splitlines()
    wrong = next((i for i, (g, w) in enumerate(zip(got, want, strict=False)) if g != w), None)
    if wrong is not None:
        report.problems.append(
            f"{index}: line {wrong + 1} is {got[wrong]!r} but the record at offset {want[wrong].split()[0]} "
            f"needs {want[wrong]!r}; rebuild it with tfrecord2idx"
        )
    elif len(got) != len(want):
        report.problems.append(f"{index}: {len(got)} entries for {len(want)} records; rebuild it with tfrecord2idx")


class _HashingReader:
    """A file wrapper that hashes every byte read through it, so a shard is read only once."""

    def __init__(self, f):
        self.f, self.digest = f, hashlib.sha256()

    def read(self, size: int) -> bytes:
        data = self.f.read(size)
        self.digest.update(data)
        return data


def check_shard(task: tuple[str, bool]) -> ShardReport:
    """Re-read one shard: framing and CRCs, Examples, index; with `full`, every image."""
    path, full = Path(task[0]), task[1]
    report = ShardReport(str(path))
    lines = []
    with open(path, "rb") as f:
        reader = _HashingReader(f)
        try:
            for record in tfrecord.read_records(reader, str(path)):
                _check_example(record.data, record.offset, str(path), full, report)
                lines.append(tfrecord.index_line(record.offset, record.size))
                report.records += 1
        except tfrecord.RecordError as e:
            report.problems.append(str(e))
            return report
        report.bytes = f.tell()
    report.sha256 = reader.digest.hexdigest()
    _check_index(path, "".join(lines), report)
    return report
