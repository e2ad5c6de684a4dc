"""Training and validation batches for one rank, from a shard directory, through DALI on the GPU or the CPU.

Epoch rules (a mismatch in step counts between ranks deadlocks the all-reduce):
- training: every rank runs `train_steps` steps. Each epoch has its own seed: the shard files are
  put in a new order (the same on every rank, so the ranks' slices stay disjoint), and the reader
  shuffles each rank's slice through a buffer. A rank's first `slice` samples are a permutation
  of its slice; the last step tops up from the next slice, so nothing is dropped.
- validation: every image exactly once across ranks, in shard order. Every rank runs `val_steps`
  steps of full batches; padding samples carry label -1 (`IGNORE`) and must not be counted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from nvidia.dali import types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from pipeline import gpu
from pipeline.data import augment
from pipeline.data.shards import (
    IGNORE,
    DataError,
    ShardOptions,
    ShardSet,
    find_bad_label,
    open_shards,
    shard_bounds,
)
from pipeline.format.check import check_shard
from pipeline.format.layout import SPLITS
from pipeline.options import at_least

DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16, "bfloat16": types.FLOAT}
LAYOUTS = {"NCHW": "CHW", "NHWC": "HWC"}
# --data-device: auto (the GPU where CUDA is usable; decode_device), gpu or cpu.
DECODE_DEVICES = ("auto", "gpu", "cpu")


def _default_threads(gpu: bool) -> int:
    """DALI CPU threads per rank: this host's cores shared among its ranks, and no more than a GPU decoder uses."""
    share = max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return min(share, augment.GPU_DECODE_THREADS) if gpu else share


@dataclass(frozen=True)
class DataOptions(ShardOptions):
    """What to read (ShardOptions) and how to augment it (pipeline.data.DataConfig adds what the run derives: batch,
    dtype, layout)."""

    # Side of the square training crops (and of the validation crops unless --val-crop-size is given).
    crop_size: int = 224
    # Validation: resize the shorter side to this, then center-crop the validation crop.
    val_resize: int = 256
    # Side of the validation center crop (default: --crop-size). Testing above the training size gains accuracy
    # (Touvron et al. 2019, FixRes; FFCV trains at up to 192 and tests at 256 with --val-resize 292).
    val_crop_size: int | None = None
    # Where decoding runs: auto (the GPU when there is one), gpu or cpu.
    data_device: str = "auto"
    # DALI CPU threads per rank (0: this host's cores divided by its ranks, at most 4 when decoding on a GPU).
    data_threads: int = 0
    # Base seed of data order, augmentation and the initial weights.
    seed: int = 0
    # Share of JPEGs for the GPU's hardware JPEG decoder, 0..1 (default: chosen per GPU model in augment.py).
    hw_decoder_load: float | None = None
    # Batches DALI prepares ahead of the model (its prefetch queue depth).
    data_prefetch: int = 2
    # Samples each rank's reader shuffles through (more mixes further, costs host memory).
    shuffle_buffer: int = 8192
    # Progressive resizing: the training crop's side starts at this and grows to --crop-size between
    # --ramp-start-epoch and --ramp-end-epoch (FFCV's 16-epoch recipe: 160 to 192 over epochs 11 to 13).
    ramp_start_size: int | None = None
    # Epoch up to which the training crop keeps --ramp-start-size.
    ramp_start_epoch: float = 0.0
    # Epoch from which the training crop is --crop-size.
    ramp_end_epoch: float = 0.0
    # Between the two, the interpolated side is rounded to the nearest multiple of this (FFCV: 32).
    ramp_rounding: int = 32
    # Read the ramp at each epoch's number (epoch, FFCV's) or at each step's epoch position (step).
    ramp_by: str = "epoch"

    @property
    def val_crop(self) -> int:
        """Side of the validation center crop."""
        return self.val_crop_size or self.crop_size

    def __post_init__(self):
        super().__post_init__()
        at_least(self, ("crop_size", "data_prefetch", "shuffle_buffer"), 1)
        at_least(self, ("seed", "data_threads"), 0)
        if self.val_crop_size is not None:
            at_least(self, ("val_crop_size",), 1)
        if self.val_resize < self.val_crop:
            flag = "--val-crop-size" if self.val_crop_size is not None else "--crop-size"
            raise ValueError(f"--val-resize {self.val_resize} is smaller than {flag} {self.val_crop}")
        if self.data_device not in DECODE_DEVICES:
            raise ValueError(f"--data-device {self.data_device}: use auto, gpu or cpu")
        if self.hw_decoder_load is not None and not 0 <= self.hw_decoder_load <= 1:
            raise ValueError(f"--hw-decoder-load {self.hw_decoder_load}: must lie in [0, 1]")
        if self.ramp_by not in ("epoch", "step"):
            raise ValueError(f"--ramp-by {self.ramp_by}: use epoch or step")
        if self.ramp_start_size is not None:
            at_least(self, ("ramp_start_size", "ramp_rounding"), 1)
            if not 0 <= self.ramp_start_epoch <= self.ramp_end_epoch:
                raise ValueError(
                    f"--ramp-start-epoch {self.ramp_start_epoch}, --ramp-end-epoch {self.ramp_end_epoch}: need "
                    "0 <= start <= end"
                )

    @functools.cached_property
    def ramp(self) -> augment.ResolutionRamp | None:
        """The training crop's progressive resizing, or None (every crop is --crop-size). Built once: DALI's
        external source asks for each iteration's side through it."""
        if self.ramp_start_size is None:
            return None
        return augment.ResolutionRamp(
            self.ramp_start_size,
            self.crop_size,
            self.ramp_start_epoch,
            self.ramp_end_epoch,
            self.ramp_rounding,
            self.ramp_by,
        )


@dataclass(frozen=True)
class DataConfig(DataOptions):
    """How to read, decode and augment the shards: the run's data options (validated there) and what the run
    derives from its DeepSpeed configuration and model."""

    # Images per rank per step: the batch-norm batch, 32 in the paper.
    batch_size: int = 32
    # Element type of image batches: float16 for fp16 runs; bfloat16 is cast from float32 in torch.
    dtype: str = "float32"
    # NHWC (channels-last) or NCHW memory; batches are always indexed (N, C, H, W).
    layout: str = "NCHW"

    def __post_init__(self):
        super().__post_init__()
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r}: use NCHW or NHWC")
        if self.batch_size < 1:
            raise ValueError(f"batch_size {self.batch_size}: must be at least 1")

    @classmethod
    def of(cls, options: DataOptions, **derived) -> DataConfig:
        """The run's data options with what it derives (batch_size, dtype, layout, or a changed device)."""
        return cls(**{**dataclasses.asdict(options), **derived})


class Batch(NamedTuple):
    """Images (N, C, H, W) on the rank's device and 0-based int64 labels (IGNORE marks padding)."""

    images: torch.Tensor
    labels: torch.Tensor


def epoch_seed(seed: int, epoch: int, *more: int) -> int:
    """A 31-bit seed for one epoch (and rank), stable across runs and machines."""
    return int(np.random.SeedSequence([seed, epoch, *more]).generate_state(1)[0] >> 1)


def train_steps_per_epoch(images: int, world_size: int, batch_size: int, grad_accum: int = 1) -> int:
    """Steps per epoch on every rank: ceil(images / global batch) optimizer steps, each of `grad_accum` micro-steps."""
    return math.ceil(images / (world_size * batch_size * grad_accum)) * grad_accum


class ImageNetData:
    """The batches one rank trains and validates on."""

    def __init__(
        self,
        config: DataConfig,
        rank: int = 0,
        world_size: int = 1,
        grad_accum: int = 1,
        splits: tuple[str, ...] = SPLITS,
        device_id: int | None = None,
        shards: ShardSet | None = None,
    ):
        self.config, self.rank, self.world_size, self.grad_accum = config, rank, world_size, grad_accum
        # `shards`: the folder already opened by the caller (with these splits), so it is not read twice.
        self.shards: ShardSet = shards or open_shards(config.data_dir, splits, config.num_classes, config.index_dir)
        for split in self.shards.splits.values():
            if split.images < world_size:
                raise DataError(f"{config.data_dir}: {split.images} {split.name} images for {world_size} ranks")
        self.gpu = decode_device(config.data_device, torch.cuda.is_available())[0] == "gpu"
        self.device_id = (
            (device_id if device_id is not None else int(os.environ.get("LOCAL_RANK", 0))) if self.gpu else None
        )
        self.device = torch.device("cuda", self.device_id) if self.gpu else torch.device("cpu")
        self._val_iter, self._val_clean = None, False
        # The shard files each split's current pipeline reads for this rank, first to last.
        self._reading: dict[str, list[str]] = {}

    @property
    def threads(self) -> int:
        """DALI CPU threads of each of this rank's pipelines."""
        return self.config.data_threads or _default_threads(self.gpu)

    def decoder_memory(self) -> dict[str, int]:
        """What this rank's two GPU decoders (training, validation) allocate up front; nothing on a CPU."""
        one = augment.decoder_memory(self.config.batch_size, self.threads) if self.gpu else {}
        return {k: 2 * v for k, v in one.items()} or {"gpu_bytes": 0, "pinned_bytes": 0}

    @property
    def num_classes(self) -> int:
        """Classes the model predicts."""
        return self.shards.num_classes

    @property
    def train_steps(self) -> int:
        """Training steps per epoch, the same on every rank."""
        return train_steps_per_epoch(
            self.shards.splits["train"].images, self.world_size, self.config.batch_size, self.grad_accum
        )

    def _slice_files(self, files: list[str], counts: list[int]) -> list[str]:
        """The files holding this rank's contiguous slice of records (in this order), then the rest."""
        start, end = shard_bounds(sum(counts), self.rank, self.world_size)
        ends = np.cumsum(counts)
        mine = [f for f, e, n in zip(files, ends, counts, strict=True) if e > start and e - n < end]
        return mine + [f for f in files if f not in mine]

    def _val_slice(self, rank: int) -> int:
        """Validation images in a rank's slice."""
        start, end = shard_bounds(self.shards.splits["validation"].images, rank, self.world_size)
        return end - start

    @property
    def val_steps(self) -> int:
        """Validation steps, the same on every rank: enough for the largest slice."""
        return math.ceil(max(self._val_slice(r) for r in range(self.world_size)) / self.config.batch_size)

    def _common(self) -> dict:
        """Pipeline arguments both splits share."""
        c = self.config
        load = c.hw_decoder_load
        if load is None:
            load = augment.hw_decoder_load(torch.cuda.get_device_capability(self.device_id) if self.gpu else None)
        return dict(
            batch_size=c.batch_size,
            num_threads=self.threads,
            device_id=self.device_id,
            prefetch_queue_depth=c.data_prefetch,
            crop=c.crop_size,
            dtype=DTYPES[c.dtype],
            layout=LAYOUTS[c.layout],
            label_base=self.shards.label_base,
            gpu=self.gpu,
            hw_load=load,
        )

    def train_epoch(self, epoch: int) -> Iterator[Batch]:
        """Exactly `train_steps` training batches of epoch `epoch` (a fresh pipeline with the epoch's seed)."""
        split = self.shards.splits["train"]
        # The same file order on every rank, so the ranks' contiguous slices stay disjoint.
        order = np.random.default_rng(epoch_seed(self.config.seed, epoch)).permutation(len(split.files))
        self._reading["train"] = self._slice_files([split.files[i] for i in order], [split.counts[i] for i in order])
        pipe = augment.train_graph(
            files=[split.files[i] for i in order],
            indexes=[split.indexes[i] for i in order],
            shard_id=self.rank,
            num_shards=self.world_size,
            shuffle_buffer=min(self.config.shuffle_buffer, split.images),
            seed=epoch_seed(self.config.seed, epoch, self.rank),
            sides=self._sides(epoch),
            **self._common(),
        )
        pipe.build()
        with self._failures("train"):
            # No reader_name: the iterator never ends on its own, the step count does.
            batches = DALIGenericIterator(pipe, augment.output_names(self.gpu), auto_reset=False)
            for _, data in zip(range(self.train_steps), batches, strict=False):
                yield self._batch(data[0], "train")

    def crop_side(self, epoch: int, micro_step: int) -> int:
        """The training crop's side of micro-step `micro_step` of epoch `epoch` (every rank's the same)."""
        ramp = self.config.ramp
        if ramp is None:
            return self.config.crop_size
        per_epoch = self.train_steps // self.grad_accum
        return ramp.size((epoch * self.train_steps + micro_step) // self.grad_accum, per_epoch)

    def crop_sides(self, epoch: int) -> list[int]:
        """The training crop sides of an epoch, smallest first."""
        return sorted({self.crop_side(epoch, i) for i in range(0, self.train_steps, self.grad_accum)})

    def _sides(self, epoch: int):
        """The train graph's per-iteration crop sides for `epoch` (None without a ramp: the constant crop)."""
        if self.config.ramp is None:
            return None
        return augment.sizes_source(lambda iteration: self.crop_side(epoch, iteration), self.config.batch_size)

    def _val_iterator(self) -> DALIGenericIterator:
        """The validation pipeline, built once and reused every epoch (rebuilt if a pass was cut short)."""
        if self._val_iter is None or not self._val_clean:
            split = self.shards.splits["validation"]
            self._reading["validation"] = self._slice_files(list(split.files), list(split.counts))
            pipe = augment.val_graph(
                files=split.files,
                indexes=split.indexes,
                shard_id=self.rank,
                num_shards=self.world_size,
                resize=self.config.val_resize,
                seed=epoch_seed(self.config.seed, 0, self.rank),
                **{**self._common(), "crop": self.config.val_crop},
            )
            pipe.build()
            self._val_iter = DALIGenericIterator(
                pipe,
                augment.output_names(self.gpu),
                reader_name="validation",
                last_batch_policy=LastBatchPolicy.FILL,
                auto_reset=True,
            )
        return self._val_iter

    def validation(self) -> Iterator[Batch]:
        """Exactly `val_steps` full validation batches; samples past this rank's slice have label IGNORE."""
        left, steps, batch = self._val_slice(self.rank), 0, None
        with self._failures("validation"):
            batches = self._val_iterator()
            self._val_clean = False
            for data in batches:
                real = min(left, self.config.batch_size)
                batch = self._batch(data[0], "validation", real)
                left, steps = left - real, steps + 1
                yield batch
        self._val_clean = True
        # DALI already pads every slice to the largest one's batch count; this only guards that rule.
        for _ in range(self.val_steps - steps):
            yield Batch(batch.images, torch.full_like(batch.labels, IGNORE))

    @contextmanager
    def _failures(self, split: str) -> Iterator[None]:
        """Turn DALI's multi-line pipeline errors (an image that does not decode) into one line with the fix."""
        try:
            yield
        except RuntimeError as e:
            # DALI says which operator failed, then "encountered:", then the cause, but not which record.
            cause = str(e).split("encountered:")[-1].strip().splitlines()[0]
            root = self.shards.root
            where = self._locate(split)
            if where:
                raise DataError(f"{where}; DALI: {cause}; rebuild or remove that shard") from e
            raise DataError(
                f"{root}: a {split} record failed in DALI ({cause}); find it with "
                f"python -m data_prep.verify {root} --full, then rebuild or remove its shard"
            ) from e

    def _locate(self, split: str) -> str | None:
        """The first damaged record in the shards this rank was reading (the record DALI failed on), or None."""
        files = self._reading.get(split, self.shards.splits[split].files)
        print(f"locating the {split} record DALI could not read in {len(files)} shards...", file=sys.stderr)
        for path in files:
            problems = check_shard((path, True)).problems
            if problems:
                return problems[0]
        return None

    def _batch(self, data: dict, split: str, real: int | None = None) -> Batch:
        """Check the labels on the host, mask padding, and give the images the configured layout and dtype."""
        host = data["host_labels" if self.gpu else "labels"].view(-1)[:real]
        # Host-side labels: this check costs no device synchronisation.
        if host.numel() and (int(host.min()) < 0 or int(host.max()) >= self.num_classes):
            raise DataError(self._bad_label(split))
        labels = data["labels"].view(-1)
        if real is not None and real < labels.numel():
            labels = labels.clone()
            labels[real:] = IGNORE
        images = data["images"]
        if self.config.layout == "NHWC":
            # A view, not a copy: (N, H, W, C) memory indexed as (N, C, H, W) is torch's channels_last.
            images = images.permute(0, 3, 1, 2)
        if self.config.dtype == "bfloat16":
            # Numerics: DALI has no bfloat16, so float32 pixels are rounded to bfloat16 here.
            images = images.to(torch.bfloat16)
        return Batch(images, labels)

    def _bad_label(self, split: str) -> str:
        """One line naming the first shard record whose label is out of range, and the fix."""
        s = self.shards
        where = find_bad_label(s.splits[split], s.label_base, s.num_classes) or f"a {split} record has a label"
        fix = "rebuild the shards" if s.has_manifest else "set --num-classes to cover the labels"
        return f"{where}, outside {s.label_base}..{s.label_base + s.num_classes - 1} ({s.label_source}); {fix}"


def decode_device(requested: str, cuda: bool, allow_cpu: bool = False) -> tuple[str, str | None]:
    """The one rule of where DALI decodes: "gpu" or "cpu" from --data-device (auto: the GPU where CUDA is usable),
    and a note where that is not what was asked. gpu on a host where CUDA is not usable is refused in one line
    (ValueError), unless `allow_cpu`: the CPU decodes then."""
    if requested == "gpu" and not cuda:
        if not allow_cpu:
            raise ValueError(gpu.refusal("--data-device gpu"))
        return "cpu", "--allow-cpu: --data-device gpu without a usable GPU; decoding on the CPU"
    if requested == "auto":
        return ("gpu" if cuda else "cpu"), None
    return requested, None
