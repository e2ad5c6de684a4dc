"""The DALI input pipeline on the CPU: shapes, pixels, labels, augmentation and the epoch rules across ranks."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import DataConfig, ImageNetData, epoch_seed, train_steps_per_epoch
from pipeline.data.preview import to_uint8
from pipeline.data.shards import IGNORE, DataError
from tests import procs
from tests.oracle import ffcv_resolution
from tests.pictures import colour_of, gradients, jpeg, reference_val, smooth
from tests.runs import run_module
from tests.shardsets import labelled_set, read_shard, shards_of, write_manifest, write_shards

CROP, RESIZE = 32, 36
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nobody listens on, for the rendezvous of a multi-process test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """45 train and 21 validation solid-colour images, each with its own label (1-based in the shards)."""
    return labelled_set(tmp_path_factory.mktemp("labelled"))


def loader(folder, rank=0, world=1, **options) -> ImageNetData:
    """A CPU loader with small crops."""
    settings = dict(
        batch_size=4, crop_size=CROP, val_resize=RESIZE, data_device="cpu", data_threads=2, shuffle_buffer=16
    )
    return ImageNetData(DataConfig(str(folder), **{**settings, **options}), rank=rank, world_size=world)


def labels_of(batches) -> list[int]:
    """Every label of a list of batches, padding included."""
    return [x for b in batches for x in b.labels.tolist()]


@pytest.mark.parametrize(
    ("dtype", "layout", "torch_dtype"),
    [("float32", "NCHW", torch.float32), ("float16", "NHWC", torch.float16), ("bfloat16", "NHWC", torch.bfloat16)],
)
def test_batches_have_the_configured_shape_dtype_and_layout(labelled, dtype, layout, torch_dtype):
    data = loader(labelled, dtype=dtype, layout=layout)
    for batch in (next(iter(data.train_epoch(0))), next(iter(data.validation()))):
        assert batch.images.shape == (4, 3, CROP, CROP)
        assert batch.images.dtype == torch_dtype
        assert batch.images.device.type == "cpu"
        memory = torch.channels_last if layout == "NHWC" else torch.contiguous_format
        assert batch.images.is_contiguous(memory_format=memory)
        assert batch.labels.dtype == torch.int64
        assert batch.labels.shape == (4,)


def test_every_training_image_arrives_with_its_own_label(labelled):
    data = loader(labelled)
    seen = 0
    for batch in data.train_epoch(0):
        pixels = to_uint8(batch.images).reshape(len(batch.labels), -1, 3).astype(int)
        for label, image in zip(batch.labels.tolist(), pixels, strict=True):
            # Shards hold labels 1..45 for images coloured by label - 1; the loss gets 0-based labels.
            assert 0 <= label < 45
            assert np.abs(image - colour_of(label)).max() <= 6, f"image of label {label} has the wrong colour"
            seen += 1
    assert seen == data.train_steps * 4


def test_validation_labels_are_zero_based_in_shard_order(labelled):
    data = loader(labelled)
    expected = [r["image/class/label"] - 1 for s in shards_of(labelled, "validation") for r in read_shard(s)]
    got = [x for x in labels_of(data.validation()) if x != IGNORE]
    assert got == expected == list(range(21))
    assert data.num_classes == 64
    assert data.shards.class_names[0] == "n00000001"


def test_random_resized_crop_and_flip_follow_the_recipe(tmp_path):
    # Red rises left to right and green top to bottom, so each output tells its crop box and flip.
    images = [(jpeg(gradients(256, 192)), 1)] * 96
    write_shards(tmp_path, "train", images, 2)
    write_shards(tmp_path, "validation", images[:2], 1)
    data = loader(tmp_path, batch_size=32, crop_size=64, val_resize=64, num_classes=1)
    flipped, areas, aspects = 0, [], []
    for batch in data.train_epoch(0):
        for image in to_uint8(batch.images).astype(float):
            red, green = image[:, :, 0].mean(0), image[:, :, 1].mean(1)
            width, height = abs(red[-1] - red[0]) / 255 * 64 / 63, (green[-1] - green[0]) / 255 * 64 / 63
            flipped += red[-1] < red[0]
            areas.append(width * height)
            aspects.append(width * 256 / (height * 192))
    assert 0.3 < flipped / len(areas) < 0.7, f"{flipped} of {len(areas)} flipped"
    assert min(areas) > 0.08 - 0.015
    assert max(areas) <= 1.01
    assert min(areas) < 0.3, "crop areas do not span 8%-100%"
    assert max(areas) > 0.7, "crop areas do not span 8%-100%"
    assert 3 / 4 - 0.03 < min(aspects)
    assert max(aspects) < 4 / 3 + 0.03


def test_validation_pixels_match_a_reference_resize_and_center_crop(tmp_path):
    sizes = [(300, 200), (200, 300), (257, 256), (130, 410), (500, 333), (96, 120), (224, 224)]
    images = [(jpeg(smooth(w, h, seed=k), quality=97), 1) for k, (w, h) in enumerate(sizes)]
    write_shards(tmp_path, "validation", images, 2)
    write_shards(tmp_path, "train", images, 1)
    data = loader(tmp_path, batch_size=3, crop_size=224, val_resize=256, num_classes=1)
    got = np.concatenate([to_uint8(b.images[b.labels != IGNORE]) for b in data.validation()])
    assert len(got) == len(sizes)
    for (encoded, _), pixels, size in zip(images, got, sizes, strict=True):
        diff = np.abs(pixels.astype(int) - reference_val(encoded, 256, 224))
        # Same libjpeg-turbo, same filter: only rounding differs (measured: mean 0.2, max 1).
        assert diff.mean() < 0.5, f"{size}: mean {diff.mean():.2f}, max {diff.max()}"
        assert diff.max() <= 2, f"{size}: mean {diff.mean():.2f}, max {diff.max()}"


@pytest.mark.parametrize("world", [2, 3])
def test_validation_covers_every_image_exactly_once_across_ranks(labelled, world):
    # 21 images (odd) in batches of 4: slices of 10/11 (2 ranks) or 7 (3 ranks) end mid-batch.
    per_rank = []
    for rank in range(world):
        data = loader(labelled, rank, world)
        first, second = list(data.validation()), list(data.validation())
        assert len(first) == len(second) == data.val_steps
        assert labels_of(first) == labels_of(second), "a second pass must give the same batches"
        assert all(b.images.shape[0] == 4 for b in first), "validation batches are always full"
        per_rank.append(labels_of(first))
    assert len({len(x) for x in per_rank}) == 1, "every rank must run the same number of validation steps"
    real = [x for labels in per_rank for x in labels if x != IGNORE]
    assert sorted(real) == list(range(21)), "each validation image exactly once across ranks"


def test_validation_rank_with_a_shorter_slice_pads_a_whole_batch(tmp_path):
    images = [(jpeg(np.full((40, 40, 3), 9, np.uint8)), 1 + k % 2) for k in range(9)]
    write_shards(tmp_path, "validation", images, 1)
    write_shards(tmp_path, "train", images, 1)
    # 9 images on 2 ranks: slices of 4 and 5; batches of 4 need 1 and 2 steps.
    steps = [[b.labels.tolist() for b in loader(tmp_path, r, 2, num_classes=2).validation()] for r in range(2)]
    assert steps[0][1] == [IGNORE] * 4
    assert len(steps[0]) == len(steps[1]) == 2
    assert sum(x != IGNORE for s in steps for b in s for x in b) == 9


def test_a_validation_pass_cut_short_does_not_shift_the_next(labelled):
    data = loader(labelled)
    full = labels_of(data.validation())
    next(iter(data.validation()))
    assert labels_of(data.validation()) == full


def test_training_epochs_are_disjoint_permutations_with_equal_steps(labelled):
    world, n = 2, 45
    data = [loader(labelled, r, world) for r in range(world)]
    assert data[0].train_steps == data[1].train_steps == train_steps_per_epoch(n, world, 4) == 6
    for epoch in (0, 1):
        firsts = []
        for rank, d in enumerate(data):
            labels = labels_of(d.train_epoch(epoch))
            assert len(labels) == d.train_steps * 4
            size = n * (rank + 1) // world - n * rank // world
            assert len(set(labels[:size])) == size, "a rank's slice comes out as a permutation"
            firsts.append(labels[:size])
        assert sorted(firsts[0] + firsts[1]) == list(range(n)), f"epoch {epoch}: the slices cover the set once"
    assert labels_of(data[0].train_epoch(0)) == labels_of(data[0].train_epoch(0)), "same seed and epoch, same order"
    assert labels_of(data[0].train_epoch(0)) != labels_of(data[0].train_epoch(1)), "each epoch has its own order"
    other_seed = loader(labelled, 0, world, seed=1)
    assert labels_of(other_seed.train_epoch(0)) != labels_of(data[0].train_epoch(0))


def test_train_steps_follow_the_optimizer_step_count():
    # ImageNet, batch 8192 as 32 ranks x 32 images x 8 accumulation steps: ceil(N / B) = 157 optimizer steps.
    assert train_steps_per_epoch(1_281_167, 32, 32, 8) == 157 * 8
    assert train_steps_per_epoch(1_281_167, 256, 32) == 157
    assert train_steps_per_epoch(64, 2, 32) == 1


def test_epoch_seeds_differ_by_epoch_and_rank():
    seeds = {epoch_seed(0, e, r) for e in range(50) for r in range(8)}
    assert len(seeds) == 400
    assert all(0 <= s < 2**31 for s in seeds)
    assert epoch_seed(0, 3, 1) == epoch_seed(0, 3, 1)


def test_third_party_shards_without_index_or_manifest(tmp_path):
    items = [(jpeg(np.full((50, 60, 3), colour_of(k), np.uint8)), k + 1) for k in range(10)]
    write_shards(tmp_path, "train", items, 3, index=False)
    write_shards(tmp_path, "validation", items[:5], 2, index=False)
    data = loader(tmp_path)
    assert data.num_classes == 1000
    assert data.shards.label_base == 1
    assert data.shards.class_names[999] == "class 999"
    assert sorted(x for x in labels_of(data.validation()) if x != IGNORE) == list(range(5))
    assert len(list(tmp_path.glob("*.idx"))) == 5


def test_a_label_outside_the_range_names_the_shard(tmp_path):
    items = [(jpeg(np.zeros((40, 40, 3), np.uint8)), k + 1) for k in range(8)]
    write_shards(tmp_path, "train", items, 2)
    write_shards(tmp_path, "validation", items, 2)
    with pytest.raises(DataError, match=r"validation-00001-of-00002: record at offset \d+ has label 6, outside 1\.\.5"):
        list(loader(tmp_path, num_classes=5).validation())
    with pytest.raises(DataError, match=r"train-0000\d-of-00002: record at offset \d+ has label \d, outside 1\.\.5"):
        list(loader(tmp_path, num_classes=5).train_epoch(0))
    write_manifest(tmp_path, 7, {"train": 8, "validation": 8})
    with pytest.raises(DataError, match=r"has label 8, outside 1\.\.7 \(.*manifest.json\); rebuild the shards"):
        list(loader(tmp_path).validation())
    # Label 0 is TensorFlow's "background", not a class: 0-based shards need a manifest saying so.
    write_manifest(tmp_path, 9, {"train": 8, "validation": 8}, label_base=0)
    assert sorted(labels_of(loader(tmp_path).validation())) == list(range(1, 9))


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("dtype", "int8", "dtype 'int8'"),
        ("layout", "CHWN", "layout 'CHWN'"),
        ("data_device", "tpu", "--data-device tpu"),
        ("batch_size", 0, "batch_size 0"),
        ("val_resize", 100, "--val-resize 100"),
        ("hw_decoder_load", 2, "--hw-decoder-load 2"),
    ],
)
def test_config_rejects_bad_values(option, value, message):
    """The run's options are checked once, by config.DataOptions (naming the flag); what the run derives, here."""
    with pytest.raises(ValueError, match=message):
        DataConfig("x", crop_size=224, **{option: value})


def test_a_missing_folder_or_split_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        loader(tmp_path / "nope")
    with pytest.raises(DataError, match="no train-\\* shards; build them with make prep-imagenet"):
        loader(tmp_path)


def test_prepared_shards_read_end_to_end(prepared):
    # data_prep's own output, quirks re-encoded: every validation record decodes and keeps its label.
    data = loader(prepared, batch_size=8)
    labels = [x for x in labels_of(data.validation()) if x != IGNORE]
    expected = [r["image/class/label"] - 1 for s in shards_of(prepared, "validation") for r in read_shard(s)]
    assert labels == expected
    assert Counter(labels_of(data.train_epoch(0))).keys() <= set(range(data.num_classes))


@pytest.mark.slow
def test_two_real_processes_see_every_validation_image_once(labelled, tmp_path):
    out = tmp_path / "ranks.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "tests" / "data_ranks.py"),
        str(labelled),
        str(out),
    ]
    proc = procs.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    ranks = result["ranks"]
    assert len(ranks[0]["train"]) == len(ranks[1]["train"]) == train_steps_per_epoch(45, 2, 4)
    assert len(ranks[0]["validation"]) == len(ranks[1]["validation"]) == 3
    real = sorted(x for r in ranks for b in r["validation"] for x in b if x != IGNORE)
    assert real == list(range(21))
    assert result["validation_counted"] == 21
    firsts = ranks[0]["train"], ranks[1]["train"]
    slices = [[x for b in firsts[r] for x in b][: 45 * (r + 1) // 2 - 45 * r // 2] for r in range(2)]
    assert sorted(slices[0] + slices[1]) == list(range(45)), "the ranks' first passes cover the train set once"


def test_gpu_graphs_are_well_formed_without_a_gpu(labelled):
    # Defining a DALI graph checks every operator argument against its schema, so the mixed-device
    # graphs (nvJPEG options, hardware-decoder load, preallocation hints) are checked here on any host.
    from nvidia.dali import types

    from pipeline.data import augment

    data = loader(labelled)
    for graph, split, extra in (
        (augment.train_graph, "train", {"shuffle_buffer": 16}),
        (augment.val_graph, "validation", {"resize": 36}),
    ):
        files = data.shards.splits[split]
        graph(
            files=files.files,
            indexes=files.indexes,
            shard_id=0,
            num_shards=1,
            crop=32,
            dtype=types.FLOAT16,
            layout="HWC",
            label_base=1,
            gpu=True,
            hw_load=augment.hw_decoder_load((9, 0)),
            batch_size=4,
            num_threads=1,
            device_id=0,
            **extra,
        )
    assert augment.hw_decoder_load((8, 0)) == 0.65
    assert augment.hw_decoder_load((7, 5)) == 0.65


def test_an_image_that_does_not_decode_is_a_one_line_error_with_the_way_to_find_it(tmp_path):
    good = jpeg(np.zeros((40, 40, 3), np.uint8))
    items = [(good, 1)] * 6 + [(good[:200], 1), (b"not a picture" * 20, 1)]
    write_shards(tmp_path, "train", items, 2)
    write_shards(tmp_path, "validation", items, 2)
    for split, run in (("validation", lambda d: d.validation()), ("train", lambda d: d.train_epoch(0))):
        with pytest.raises(DataError) as failure:
            list(run(loader(tmp_path, num_classes=1)))
        message = str(failure.value)
        # The record is located: the shard, its offset, and why, on one line.
        assert "\n" not in message
        assert re.match(f"{tmp_path}/{split}-0000\\d-of-00002: record at offset \\d+: ", message)
        assert "; DALI: " in message
        assert message.endswith("rebuild or remove that shard")
    # data_prep.verify finds the damaged records too.
    found = run_module("data_prep.verify", str(tmp_path), "--full")
    assert found.returncode == 1
    assert "validation-00001-of-00002: record at offset" in found.stdout


def test_the_resolution_ramp_is_ffcvs():
    from pipeline.data.augment import ResolutionRamp

    # FFCV's rn50_16_epochs.yaml: 160 to 192 over epochs 11 to 13; rn50_88_epochs.yaml: 65 to 76.
    for start, end in ((11, 13), (65, 76)):
        ramp = ResolutionRamp(160, 192, start, end)
        assert [ramp.size(e * 10 + 3, 10) for e in range(90)] == [
            ffcv_resolution(e, start, end, 160, 192, 32) for e in range(90)
        ]
    by_step = ResolutionRamp(16, 32, 0.5, 1.5, rounding=4, by="step")
    assert [by_step.size(s, 6) for s in range(12)] == [ffcv_resolution(s / 6, 0.5, 1.5, 16, 32, 4) for s in range(12)]
    assert len({by_step.size(s, 6) for s in range(12)}) > 3
    with pytest.raises(ValueError, match="its resolution ramp .* is not this run's"):
        by_step.load_state_dict(ResolutionRamp(16, 32, 0.5, 2.0, rounding=4, by="step").state_dict())
    by_step.load_state_dict(by_step.state_dict())


def test_each_batch_has_the_side_the_ramp_gives_its_step_despite_prefetching(labelled):
    """A by-step ramp read through DALI's external source, 3 batches prefetched, 2 micro-batches per optimizer step:
    every batch of two epochs is as large as the ramp says for its step (an independent count of steps)."""
    config = DataConfig(str(labelled), batch_size=4, crop_size=32, val_resize=36, data_device="cpu", data_threads=2,
                        shuffle_buffer=16, data_prefetch=3, ramp_start_size=16, ramp_start_epoch=0.5,
                        ramp_end_epoch=1.5, ramp_rounding=4, ramp_by="step")  # fmt: skip
    data = ImageNetData(config, grad_accum=2)
    micro_per_epoch = 2 * -(-45 // 8)
    assert data.train_steps == micro_per_epoch
    seen, expected = [], []
    for epoch in range(2):
        for i, batch in enumerate(data.train_epoch(epoch)):
            assert batch.images.shape[2] == batch.images.shape[3]
            seen.append(batch.images.shape[2])
            step = (epoch * micro_per_epoch + i) // 2
            expected.append(ffcv_resolution(step / (micro_per_epoch // 2), 0.5, 1.5, 16, 32, 4))
    assert seen == expected
    assert len(set(seen)) > 3
    assert data.crop_sides(0) == sorted(set(expected[:micro_per_epoch]))
    # Without a ramp every batch has the crop size (the graph as it always was).
    assert {b.images.shape[2] for b in loader(labelled).train_epoch(0)} == {CROP}
