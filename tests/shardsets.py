"""Small TFRecord shard sets whose every pixel and label is known, written the way third parties write them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.format import example, tfrecord


def colour_of(label: int) -> tuple[int, int, int]:
    """A distinct colour per label (up to 64), at least 64 levels from any other in some channel."""
    return (32 + 64 * (label % 4), 32 + 64 * (label // 4 % 4), 32 + 64 * (label // 16 % 4))


def jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of an (H, W, 3) uint8 array."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=quality)
    return out.getvalue()


def solid(label: int, width: int, height: int) -> bytes:
    """A JPEG of one colour: the colour of its label."""
    return jpeg(np.full((height, width, 3), colour_of(label), np.uint8))


def gradients(width: int, height: int) -> np.ndarray:
    """Red rises 0..255 left to right, green top to bottom: any crop shows where it came from."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8)


def smooth(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth picture without hard edges, so resampling differences stay small."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [
        127 + 100 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * xx + rng.uniform(0.5, 2) * yy + rng.uniform()))
        for _ in range(3)
    ]
    return np.stack(channels, -1).round().astype(np.uint8)


def _size(data: bytes) -> tuple[int, int]:
    """(height, width) of an image, or (0, 0) for bytes that are not one (broken records on purpose)."""
    try:
        return Image.open(io.BytesIO(data)).size[::-1]
    except OSError:
        return 0, 0


def write_shards(
    folder: Path, split: str, images: list[tuple[bytes, int]], shards: int, index: bool = True
) -> list[Path]:
    """Write (JPEG, label) records into `shards` files in the given order, with DALI indexes if asked."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, part in enumerate(np.array_split(np.arange(len(images)), shards)):
        path = folder / f"{split}-{s:05d}-of-{shards:05d}"
        offset, lines = 0, []
        with open(path, "wb") as f:
            for i in part:
                data, label = images[i]
                h, w = _size(data)
                record = tfrecord.frame(
                    example.image_example(data, label, f"n{label:08d}", f"{split}_{i}.JPEG", h, w, 3, "RGB")
                )
                f.write(record)
                lines.append(tfrecord.index_line(offset, len(record)))
                offset += len(record)
        if index:
            path.with_name(path.name + ".idx").write_text("".join(lines))
        paths.append(path)
    return paths


def write_manifest(folder: Path, num_classes: int, counts: dict[str, int], label_base: int = 1) -> None:
    """The parts of data_prep's manifest.json the reader uses."""
    splits = {split: {"images": n} for split, n in counts.items()}
    (folder / "manifest.json").write_text(
        json.dumps({"label_base": label_base, "num_classes": num_classes, "splits": splits})
    )


def labelled_set(folder: Path, train: int = 45, val: int = 21, shards: tuple[int, int] = (4, 3)) -> Path:
    """Solid-colour images with one distinct label each (1-based, like TF), a manifest and labels.txt."""
    rng = np.random.default_rng(3)
    sizes = lambda: (int(rng.integers(40, 90)), int(rng.integers(40, 90)))  # noqa: E731
    write_shards(folder, "train", [(solid(k, *sizes()), k + 1) for k in range(train)], shards[0])
    write_shards(folder, "validation", [(solid(k, *sizes()), k + 1) for k in range(val)], shards[1])
    write_manifest(folder, 64, {"train": train, "validation": val})
    (folder / "labels.txt").write_text("".join(f"n{k + 1:08d}\n" for k in range(64)))
    return folder
