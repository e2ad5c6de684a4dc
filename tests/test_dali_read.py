"""Our shards and index files through DALI's own reader and decoder (CPU mode, as on any host)."""

import json
import math

import numpy as np
import pytest

from tests.shardsets import read_shard, shards_of

dali = pytest.importorskip("nvidia.dali")
from nvidia.dali import fn, pipeline_def, types  # noqa: E402
from nvidia.dali import tfrecord as tfrec  # noqa: E402

FEATURES = {
    "image/encoded": tfrec.FixedLenFeature((), tfrec.string, ""),
    "image/class/label": tfrec.FixedLenFeature([1], tfrec.int64, -1),
    "image/filename": tfrec.FixedLenFeature((), tfrec.string, ""),
    "image/height": tfrec.FixedLenFeature([1], tfrec.int64, -1),
    "image/width": tfrec.FixedLenFeature([1], tfrec.int64, -1),
}


def read_with_dali(paths: list[str], batch_size: int = 16) -> list[tuple[str, int, tuple, tuple]]:
    """(filename, label, decoded HWC shape, recorded (h, w)) of every record, decoded by DALI on the CPU."""

    @pipeline_def(batch_size=batch_size, num_threads=2, device_id=None)
    def pipe():
        r = fn.readers.tfrecord(
            path=paths,
            index_path=[p + ".idx" for p in paths],
            features=FEATURES,
            random_shuffle=False,
            pad_last_batch=True,
            name="reader",
        )
        image = fn.decoders.image(r["image/encoded"], device="cpu", output_type=types.RGB)
        return image, r["image/class/label"], r["image/filename"], r["image/height"], r["image/width"]

    p = pipe()
    p.build()
    size = p.epoch_size("reader")
    out = []
    for _ in range(math.ceil(size / batch_size)):
        images, labels, names, heights, widths = p.run()
        for i in range(len(images)):
            out.append(
                (
                    bytes(np.array(names.at(i))).decode(),
                    int(np.array(labels.at(i))[0]),
                    np.array(images.at(i)).shape,
                    (int(np.array(heights.at(i))[0]), int(np.array(widths.at(i))[0])),
                )
            )
    return out[:size]


@pytest.mark.parametrize("split", ["train", "validation"])
def test_dali_reads_and_decodes_every_record_with_our_indexes(prepared, split):
    paths = [str(p) for p in shards_of(prepared, split)]
    seen = read_with_dali(paths)
    expected = [
        (r["image/filename"].decode(), r["image/class/label"])
        for s in shards_of(prepared, split)
        for r in read_shard(s)
    ]
    assert [(name, label) for name, label, _, _ in seen] == expected
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert len(seen) == manifest["splits"][split]["images"]
    for name, _, shape, (h, w) in seen:
        assert shape == (h, w, 3), f"{name}: DALI decoded {shape}, record says {h}x{w}"
