"""The input pipeline: a shard folder as the reader sees it and its indexes (`shards`), the DALI graphs that decode
and augment on the GPU or the CPU (`augment`), a rank's training and validation batches (`reader`), and the preview
grid (`preview`, python -m pipeline.data.preview)."""

from pipeline.data.reader import (
    DataConfig,
    DataOptions,
    ImageNetData,
    decode_device,
    epoch_seed,
    train_steps_per_epoch,
)
from pipeline.data.shards import IGNORE, DataError, ShardSet, open_shards, shard_bounds

__all__ = [
    "IGNORE",
    "DataConfig",
    "DataError",
    "DataOptions",
    "ImageNetData",
    "ShardSet",
    "decode_device",
    "epoch_seed",
    "open_shards",
    "shard_bounds",
    "train_steps_per_epoch",
]
