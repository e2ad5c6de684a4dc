"""TFRecord framing against the format's definition, and damage detection when reading back."""

import io

import pytest

from pipeline.format import tfrecord


def reference_crc32c(data: bytes) -> int:
    """Bit-by-bit CRC-32C (Castagnoli, reflected polynomial 0x82F63B78): an oracle independent of the library."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def reference_masked(data: bytes) -> int:
    """TensorFlow's mask, as written in tensorflow/core/lib/hash/crc32c.h: rotate right 15, add 0xa282ead8."""
    crc = reference_crc32c(data)
    return ((crc >> 15 | crc << 17) + 0xA282EAD8) % 2**32


def test_crc_matches_the_published_check_value_and_the_mask():
    assert reference_crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    for data in (b"", b"123456789", bytes(32), b"\xff" * 1000):
        assert tfrecord.masked_crc(data) == reference_masked(data)


def test_frame_layout_is_length_crc_data_crc_little_endian():
    payload = b"hello tfrecord"
    framed = tfrecord.frame(payload)
    assert len(framed) == len(payload) + tfrecord.FRAMING_BYTES
    assert framed[:8] == len(payload).to_bytes(8, "little")
    assert framed[8:12] == reference_masked(framed[:8]).to_bytes(4, "little")
    assert framed[12:-4] == payload
    assert framed[-4:] == reference_masked(payload).to_bytes(4, "little")


def test_read_records_round_trip_with_offsets():
    payloads = [b"a", b"", b"x" * 5000]
    data = b"".join(tfrecord.frame(p) for p in payloads)
    records = list(tfrecord.read_records(io.BytesIO(data), "mem"))
    assert [r.data for r in records] == payloads
    assert [r.offset for r in records] == [0, 17, 33]
    assert sum(r.size for r in records) == len(data)


@pytest.mark.parametrize(
    "damage, message",
    [
        # "first" spans bytes 0-20, "second" 21-42: payload 33-38, length 21-28.
        (lambda d: d[:35] + bytes([d[35] ^ 1]) + d[36:], "record at offset 21: data CRC mismatch"),
        (lambda d: d[:22] + bytes([d[22] ^ 4]) + d[23:], "record at offset 21: length CRC mismatch"),
        (lambda d: d[:-3], "record at offset 21: truncated"),
        (lambda d: d + b"\x01\x02", "record at offset 43: truncated record header"),
    ],
)
def test_damage_is_reported_with_the_record_offset(damage, message):
    data = tfrecord.frame(b"first") + tfrecord.frame(b"second")
    with pytest.raises(tfrecord.RecordError, match=message):
        list(tfrecord.read_records(io.BytesIO(damage(data)), "shard"))


def test_a_dali_index_reads_back_as_written():
    spans = [(0, 120), (120, 4096), (4216, 77)]
    text = "".join(tfrecord.index_line(offset, size) for offset, size in spans)
    assert text.splitlines()[1] == "120 4096"
    assert tfrecord.index_spans(text) == spans
    assert tfrecord.index_spans("") is None
    assert tfrecord.index_spans("0 12 24") is None
    assert tfrecord.index_spans("0 twelve") is None
