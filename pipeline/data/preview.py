"""Pictures of what the model sees: the first samples of a split after augmentation, with their class names.

python -m pipeline.data.preview --data-dir DIR --split {train,validation} --num N --out grid.png [--save-npz F]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipeline import options
from pipeline.data import DataConfig, DataOptions, ImageNetData
from pipeline.data.augment import MEAN, STD
from pipeline.data.shards import IGNORE, DataError
from pipeline.format.layout import SPLITS

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


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input ends with a one-line error and exit status 2."""
    p = options.parser("python -m pipeline.data.preview", __doc__.split("\n")[0], {"data": DataOptions})
    p.add_argument("--split", choices=SPLITS, default="train")
    p.add_argument("--num", type=int, default=16, help="samples to show")
    p.add_argument("--out", required=True, help="picture to write (PNG)")
    p.add_argument("--save-npz", help="also save images (N,C,C,3 uint8) and labels (0-based) here")
    try:
        args = p.parse_args(argv)
        if args.num < 1:
            raise DataError(f"--num {args.num}: must be at least 1")
        config = DataConfig.of(args.data, batch_size=min(args.num, 64))
        shown = write_preview(ImageNetData(config, splits=(args.split,)), args.split, args.num, args.out, args.save_npz)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    saved = f"; pixels and labels in {args.save_npz}" if args.save_npz else ""
    print(f"{args.out}: {shown} {args.split} samples{saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
