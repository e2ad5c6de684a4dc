"""TensorFlow itself reads our shards, and writes the same bytes we do.

TensorFlow is not a dependency: this runs where it is installed (`pip install tensorflow-cpu`
into .venv) and is skipped elsewhere. Last run: TensorFlow 2.21.0, 2026-11-21, all passed.
"""

import pytest

from pipeline.format import example, tfrecord
from tests.shardsets import read_shard, shards_of

tf = pytest.importorskip("tensorflow")

# The feature map of tensorflow/models inception image_processing.parse_example_proto.
SPEC = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string, ""),
    "image/class/label": tf.io.FixedLenFeature([1], tf.int64, -1),
    "image/class/text": tf.io.FixedLenFeature([], tf.string, ""),
    "image/filename": tf.io.FixedLenFeature([], tf.string, ""),
    "image/height": tf.io.FixedLenFeature([1], tf.int64, -1),
    "image/width": tf.io.FixedLenFeature([1], tf.int64, -1),
}


def test_tf_reads_checks_parses_and_decodes_every_record(prepared):
    shards = shards_of(prepared, "train") + shards_of(prepared, "validation")
    expected = [(r["image/filename"], r["image/class/label"]) for s in shards for r in read_shard(s)]
    seen = []
    for raw in tf.data.TFRecordDataset([str(s) for s in shards]):  # verifies both masked CRCs
        f = tf.io.parse_single_example(raw, SPEC)
        image = tf.io.decode_jpeg(f["image/encoded"], channels=3)
        assert tuple(image.shape[:2]) == (int(f["image/height"][0]), int(f["image/width"][0]))
        seen.append((f["image/filename"].numpy(), int(f["image/class/label"][0])))
    assert seen == expected


def test_tf_writer_and_example_bytes_equal_ours(tmp_path):
    ours = example.image_example(b"\xff\xd8abc", 7, "n01440764", "x.JPEG", 3, 4, 3, "RGB")
    payloads = [ours, b"", b"z" * 70000]
    with tf.io.TFRecordWriter(str(tmp_path / "tf")) as writer:
        for p in payloads:
            writer.write(p)
    assert (tmp_path / "tf").read_bytes() == b"".join(tfrecord.frame(p) for p in payloads)
    parsed = tf.train.Example.FromString(ours)
    assert parsed.SerializeToString(deterministic=True) == ours
    assert list(parsed.features.feature["image/class/label"].int64_list.value) == [7]
