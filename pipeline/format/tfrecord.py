"""TFRecord framing: write records, read them back with every checksum verified, and DALI index lines.

A record on disk is: uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data),
little-endian, as TensorFlow writes it. DALI's reader needs an index of (offset, size) per record.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import crc32c

_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")
# Bytes a record adds around its payload: length, length CRC, data CRC.
FRAMING_BYTES = _LENGTH.size + 2 * _CRC.size
_MASK_DELTA = 0xA282EAD8


class RecordError(ValueError):
    """A TFRecord file is damaged; the message names the file and byte offset."""


def masked_crc(data: bytes) -> int:
    """TensorFlow's masked CRC-32C: rotate right by 15 bits and add a constant."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One record's bytes on disk: the payload with its length and both checksums."""
    length = _LENGTH.pack(len(data))
    return length + _CRC.pack(masked_crc(length)) + data + _CRC.pack(masked_crc(data))


def index_line(offset: int, size: int) -> str:
    """One line of a DALI index file, exactly as DALI's tfrecord2idx writes it."""
    return f"{offset} {size}\n"


def index_spans(text: str) -> list[tuple[int, int]] | None:
    """The (offset, size) entries of a DALI index file's text, or None when it is not one."""
    fields = text.split()
    if not fields or len(fields) % 2 or not all(f.isdigit() for f in fields):
        return None
    return [(int(fields[i]), int(fields[i + 1])) for i in range(0, len(fields), 2)]


@dataclass(frozen=True)
class Record:
    """A record read back from a file: where it starts, its framed size, and its payload."""

    offset: int
    size: int
    data: bytes


def _payload_length(
    f: BinaryIO, name: str, offset: int, check_crc: bool, bad_crc: str = "record header is corrupt"
) -> int | None:
    """Read the 12-byte header of the record at `offset` (the file is positioned there); None at the end of file."""
    header = f.read(_LENGTH.size + _CRC.size)
    if not header:
        return None
    if len(header) < _LENGTH.size + _CRC.size:
        raise RecordError(f"{name}: record at offset {offset}: truncated record header ({len(header)} of 12 bytes)")
    length_bytes, (length_crc,) = header[: _LENGTH.size], _CRC.unpack(header[_LENGTH.size :])
    if check_crc and masked_crc(length_bytes) != length_crc:
        raise RecordError(f"{name}: record at offset {offset}: length CRC mismatch ({bad_crc})")
    return _LENGTH.unpack(length_bytes)[0]


def read_records(f: BinaryIO, name: str, check_crc: bool = True) -> Iterator[Record]:
    """Yield every record of an open TFRecord file, raising RecordError at the first damage."""
    offset = 0
    while (length := _payload_length(f, name, offset, check_crc)) is not None:
        data = f.read(length)
        footer = f.read(_CRC.size)
        if len(data) < length or len(footer) < _CRC.size:
            raise RecordError(
                f"{name}: record at offset {offset}: truncated (needs {length + FRAMING_BYTES} bytes, file ends)"
            )
        if check_crc and masked_crc(data) != _CRC.unpack(footer)[0]:
            raise RecordError(f"{name}: record at offset {offset}: data CRC mismatch (record payload is corrupt)")
        size = length + FRAMING_BYTES
        yield Record(offset, size, data)
        offset += size


def record_spans(f: BinaryIO, name: str) -> Iterator[tuple[int, int]]:
    """(offset, framed size) of every record, reading only the headers (for building an index fast).

    Each length is checked against its CRC, so a file that is not TFRecord fails at its first
    record; payloads are skipped, not read. A file that ends inside a record raises RecordError.
    """
    end = f.seek(0, 2)
    offset = f.seek(0)
    while offset < end:
        size = _payload_length(f, name, offset, check_crc=True, bad_crc="not a TFRecord file?") + FRAMING_BYTES
        if offset + size > end:
            raise RecordError(f"{name}: record at offset {offset}: truncated (needs {size} bytes, file ends)")
        yield offset, size
        offset = f.seek(offset + size)
