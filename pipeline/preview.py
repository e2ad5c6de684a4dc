"""Pictures of what the model sees: the first samples of a split after augmentation, with their class names."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipeline.augment import MEAN, STD
from pipeline.data import IGNORE, ImageNetData

CAPTION = 14  # pixels of text under each picture


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) normalised images back to (N, H, W, 3) uint8 pixels (mean and std undone)."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    pixels = images.detach().float().cpu() * std + mean
    return pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def first_samples(data: ImageNetData, split: str, num: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `num` samples of a split as the model gets them: uint8 pixels and 0-based labels."""
    batches = data.train_epoch(0) if split == "train" else data.validation()
    images, labels, have = [], [], 0
    for batch in batches:
        keep = batch.labels != IGNORE
        images.append(to_uint8(batch.images[keep]))
        labels.append(batch.labels[keep].cpu().numpy())
        have += int(keep.sum())
        if have >= num:
            break
    return np.concatenate(images)[:num], np.concatenate(labels)[:num]


def grid(images: np.ndarray, captions: list[str]) -> Image.Image:
    """A near-square grid of the pictures, each with its caption underneath."""
    count, side = len(images), images.shape[1]
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    sheet = Image.new("RGB", (columns * side, rows * (side + CAPTION)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (pixels, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = (k % columns) * side, (k // columns) * (side + CAPTION)
        sheet.paste(Image.fromarray(pixels), (x, y))
        draw.text((x + 2, y + side + 1), caption, fill="black")
    return sheet


def write_preview(data: ImageNetData, split: str, num: int, out: str, npz: str | None = None) -> int:
    """Save the grid picture (and, with `npz`, the pixels and labels); returns how many samples it shows."""
    images, labels = first_samples(data, split, num)
    names = data.shards.class_names
    grid(images, [f"{label} {names[label]}" for label in labels]).save(out)
    if npz:
        Path(npz).parent.mkdir(parents=True, exist_ok=True)
        np.savez(npz, images=images, labels=labels.astype(np.int64))
    return len(images)
