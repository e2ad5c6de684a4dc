"""The DALI graphs: read records, decode, augment, normalise; one graph per split, on the GPU or the CPU.

Both devices run the same operators with the same arguments; only the decoder backend differs
(`mixed`: nvJPEG, with the A100/H100 hardware decoder taking part of the load; `cpu`: libjpeg-turbo).
Train: random-resized crop decoded straight from the JPEG's region of interest (area 8-100%,
aspect 3/4-4/3), resize to the crop size, random horizontal flip, normalise. Validation: resize
the shorter side, center crop, normalise. Labels leave the graph 0-based.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import tfrecord as tfrec

from pipeline.format import example

# ImageNet per-channel mean and standard deviation of RGB pixels in 0..255.
MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
AREA, ASPECT = (0.08, 1.0), (3 / 4, 4 / 3)

FEATURES = {
    example.ENCODED: tfrec.FixedLenFeature((), tfrec.string, ""),
    example.LABEL: tfrec.FixedLenFeature([1], tfrec.int64, -1),
}

# nvJPEG's buffers, allocated up front by each mixed decoder (a rank has two: training and validation):
# - the hardware decoder's batch buffer: micro-batch x width hint x height hint x 3 bytes of GPU memory;
# - per CPU thread, one device buffer of `device_memory_padding` and two pinned host buffers of
#   `host_memory_padding` (double-buffered).
# Sized for a 3-megapixel photo, larger than nearly every ImageNet image (most are about 500 x 375); a larger
# one grows its buffer once. NVIDIA's DeepLearningExamples hints (5980 x 6430, 211 MB / 140 MB paddings) cost
# 3.4 GiB of GPU and 4.5 GB of pinned memory per decoder at batch 32 and 16 threads.
WIDTH_HINT, HEIGHT_HINT = 2048, 1536
_NVJPEG_PREALLOCATION = dict(
    device_memory_padding=16 << 20,
    host_memory_padding=8 << 20,
    preallocate_width_hint=WIDTH_HINT,
    preallocate_height_hint=HEIGHT_HINT,
)
# CPU threads per GPU decoder: they parse the JPEGs and decode the share the hardware decoder does not take.
GPU_DECODE_THREADS = 4


def decoder_memory(batch_size: int, threads: int) -> dict[str, int]:
    """Bytes one mixed decoder allocates up front: GPU memory and pinned host memory."""
    hw = batch_size * WIDTH_HINT * HEIGHT_HINT * 3
    return {
        "gpu_bytes": hw + threads * _NVJPEG_PREALLOCATION["device_memory_padding"],
        "pinned_bytes": 2 * threads * _NVJPEG_PREALLOCATION["host_memory_padding"],
    }


# Share of JPEGs sent to the hardware decoder, by GPU compute capability. A100 (8.0) has one
# NVJPG engine and 0.65 is NVIDIA's measured optimum for it; H100/H200 (9.0) have seven, so more of
# the load goes there. Other GPUs have no hardware decoder and ignore the setting.
HW_DECODER_LOAD = {(8, 0): 0.65, (9, 0): 0.9}


def hw_decoder_load(capability: tuple[int, int] | None) -> float:
    """The default hardware-decoder share for a GPU of this compute capability."""
    return HW_DECODER_LOAD.get(capability, 0.65)


def _read(files, indexes, shard_id, num_shards, name, shuffle_buffer=None):
    """This rank's records: shuffled through a buffer of `shuffle_buffer` samples (training), or in order."""
    training = shuffle_buffer is not None
    records = fn.readers.tfrecord(
        path=list(files),
        index_path=list(indexes),
        features=FEATURES,
        shard_id=shard_id,
        num_shards=num_shards,
        random_shuffle=training,
        initial_fill=shuffle_buffer if training else 1,
        # Validation: the last batch of a slice is padded (with its last sample) instead of running
        # into the next slice, and every pass reads the same slice (readers move on by default).
        pad_last_batch=not training,
        stick_to_shard=not training,
        name=name,
    )
    return records[example.ENCODED], records[example.LABEL]


def _decoder_options(gpu: bool, hw_load: float) -> dict:
    """Backend and memory hints for the image decoders."""
    if not gpu:
        return dict(device="cpu", output_type=types.RGB)
    return dict(device="mixed", output_type=types.RGB, hw_decoder_load=hw_load, **_NVJPEG_PREALLOCATION)


def output_names(gpu: bool) -> list[str]:
    """What the graphs return, in order (the reader's DALIGenericIterator output map): images, 0-based labels on the
    images' device, and (on the GPU) the same labels on the host for range checks."""
    return ["images", "labels", "host_labels"] if gpu else ["images", "labels"]


def _returned(images, labels, label_base: int, gpu: bool) -> tuple:
    """A graph's outputs, in the order of output_names."""
    labels = labels - label_base
    outputs = {"images": images, "labels": labels.gpu() if gpu else labels, "host_labels": labels}
    return tuple(outputs[name] for name in output_names(gpu))


def _normalise(images, dtype, layout: str, crop: int | None = None, mirror=None):
    """Crop (when asked), flip (when asked), subtract the mean, divide by the std, cast, lay out as HWC or CHW."""
    cropping = dict(crop=(crop, crop)) if crop else {}
    flipping = dict(mirror=mirror) if mirror is not None else {}
    return fn.crop_mirror_normalize(
        images, mean=list(MEAN), std=list(STD), dtype=dtype, output_layout=layout, **cropping, **flipping
    )


@dataclass(frozen=True)
class ResolutionRamp:
    """Progressive resizing (FFCV's ResNet recipes): the training crop's side is `start_size` up to `start_epoch`,
    `end_size` from `end_epoch` on, and in between the linear interpolation rounded to the nearest multiple of
    `rounding`. `by`: "epoch" reads the ramp at each epoch's number (FFCV), "step" at the step's epoch position
    (step / steps per epoch). A pure function of the optimizer step: a resume continues it exactly. A checkpoint
    component that refuses a checkpoint of another ramp."""

    start_size: int
    end_size: int
    start_epoch: float
    end_epoch: float
    rounding: int = 32
    by: str = "epoch"

    def size(self, step: int, steps_per_epoch: int) -> int:
        """The crop side of optimizer step `step` (0-based)."""
        epoch = step // steps_per_epoch if self.by == "epoch" else step / steps_per_epoch
        if epoch <= self.start_epoch:
            return self.start_size
        if epoch >= self.end_epoch:
            return self.end_size
        side = np.interp(epoch, [self.start_epoch, self.end_epoch], [self.start_size, self.end_size])
        return int(np.round(side / self.rounding)) * self.rounding

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        if state != self.state_dict():
            raise ValueError(
                f"its resolution ramp {state} is not this run's {self.state_dict()}; resume with the ramp flags "
                "it was saved with"
            )


def sizes_source(side: Callable[[int], int], batch_size: int) -> Callable:
    """An external_source callback: each iteration's crop side (`side(iteration)`), one per sample. DALI passes the
    iteration index of the batch it prepares, so prefetching ahead never shifts a size to another batch."""

    def source(info) -> np.ndarray:
        return np.full(batch_size, side(info.iteration), dtype=np.float32)

    return source


@pipeline_def
def train_graph(
    files, indexes, shard_id, num_shards, shuffle_buffer, crop, dtype, layout, label_base, gpu, hw_load, sides=None
):
    """Random-resized crop (decoding only the crop), resize to `crop` (or, with `sides`, to each iteration's side:
    an argument input fed by an external source), random flip, normalise."""
    jpegs, labels = _read(files, indexes, shard_id, num_shards, "train", shuffle_buffer)
    images = fn.decoders.image_random_crop(
        jpegs,
        random_area=list(AREA),
        random_aspect_ratio=list(ASPECT),
        num_attempts=100,
        **_decoder_options(gpu, hw_load),
    )
    if sides is not None:
        crop = fn.external_source(source=sides, batch=True, batch_info=True, dtype=types.FLOAT)
    images = fn.resize(images, resize_x=crop, resize_y=crop, interp_type=types.INTERP_LINEAR, antialias=True)
    images = _normalise(images, dtype, layout, mirror=fn.random.coin_flip(probability=0.5))
    return _returned(images, labels, label_base, gpu)


@pipeline_def
def val_graph(files, indexes, shard_id, num_shards, resize, crop, dtype, layout, label_base, gpu, hw_load):
    """Decode, resize the shorter side to `resize`, center crop `crop`, normalise."""
    jpegs, labels = _read(files, indexes, shard_id, num_shards, "validation")
    images = fn.decoders.image(jpegs, **_decoder_options(gpu, hw_load))
    images = fn.resize(images, resize_shorter=resize, interp_type=types.INTERP_LINEAR, antialias=True)
    images = _normalise(images, dtype, layout, crop=crop)
    return _returned(images, labels, label_base, gpu)
