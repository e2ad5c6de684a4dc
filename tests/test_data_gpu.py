"""The same pipeline with `device="mixed"` decoding on a GPU (skipped without one): device, dtype, pixels, epochs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data import DataConfig, ImageNetData
from pipeline.data.preview import to_uint8
from pipeline.data.shards import IGNORE
from tests.pictures import colour_of, jpeg, smooth
from tests.shardsets import labelled_set, write_shards

pytestmark = pytest.mark.gpu


def gpu_loader(folder, rank=0, world=1, **options) -> ImageNetData:
    """A loader decoding with nvJPEG on GPU 0."""
    settings = dict(batch_size=4, crop_size=32, val_resize=36, data_device="gpu", data_threads=2, shuffle_buffer=16)
    return ImageNetData(DataConfig(str(folder), **{**settings, **options}), rank=rank, world_size=world, device_id=0)


def test_gpu_batches_stay_on_the_device_in_fp16_channels_last(tmp_path):
    data = gpu_loader(labelled_set(tmp_path), dtype="float16", layout="NHWC")
    for batch in (next(iter(data.train_epoch(0))), next(iter(data.validation()))):
        assert batch.images.device == torch.device("cuda", 0)
        assert batch.labels.device == torch.device("cuda", 0)
        assert batch.images.dtype == torch.float16
        assert batch.images.shape == (4, 3, 32, 32)
        assert batch.images.is_contiguous(memory_format=torch.channels_last)


def test_gpu_training_images_keep_their_labels(tmp_path):
    data = gpu_loader(labelled_set(tmp_path))
    for batch in data.train_epoch(0):
        pixels = to_uint8(batch.images).reshape(4, -1, 3).astype(int)
        for label, image in zip(batch.labels.tolist(), pixels, strict=True):
            assert np.abs(image - colour_of(label)).max() <= 8


def test_gpu_validation_matches_the_cpu_pipeline(tmp_path):
    images = [(jpeg(smooth(w, h, seed=w), quality=97), 1) for w, h in [(300, 200), (200, 300), (500, 375)]]
    write_shards(tmp_path, "validation", images, 1)
    write_shards(tmp_path, "train", images, 1)
    options = dict(batch_size=3, crop_size=224, val_resize=256, num_classes=1)
    gpu = to_uint8(next(iter(gpu_loader(tmp_path, **options).validation())).images).astype(int)
    cpu_config = DataConfig(str(tmp_path), data_device="cpu", **options)
    cpu = to_uint8(next(iter(ImageNetData(cpu_config).validation())).images).astype(int)
    # nvJPEG and libjpeg-turbo round their IDCTs differently; the geometry must be identical.
    assert np.abs(gpu - cpu).mean() < 1.5


def test_gpu_validation_covers_every_image_once_across_ranks(tmp_path):
    folder = labelled_set(tmp_path)
    seen = [x for r in range(2) for b in gpu_loader(folder, r, 2).validation() for x in b.labels.tolist()]
    assert sorted(x for x in seen if x != IGNORE) == list(range(21))


def test_gpu_decoders_allocate_about_what_the_run_records(tmp_path):
    """Both decoders of a rank at micro-batch 32 and the default threads: the GPU memory they take is close to
    `decoder_memory()` (DALI's own pool and CUDA's kernels account for the margin), far below the 7 GB that
    DeepLearningExamples' hints took."""
    folder = labelled_set(tmp_path, train=64)
    free_before = torch.cuda.mem_get_info(0)[0]
    data = gpu_loader(folder, batch_size=32, crop_size=224, val_resize=256, data_threads=0)
    next(iter(data.train_epoch(0)))
    next(iter(data.validation()))
    used = free_before - torch.cuda.mem_get_info(0)[0]
    recorded = data.decoder_memory()
    assert data.threads <= 4
    assert recorded["gpu_bytes"] < 1 << 30
    assert recorded["pinned_bytes"] < 1 << 28
    assert used < recorded["gpu_bytes"] + (768 << 20), (used, recorded)
