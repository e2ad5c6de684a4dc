"""Pictures whose every pixel is known: solid colours per label, gradients, smooth fields, and a Pillow reference of
the validation resize and crop."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


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


def reference_val(data: bytes, resize: int, crop: int) -> np.ndarray:
    """Resize the shorter side (bilinear, antialiased, size rounded) and take the center crop, with Pillow."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    scale = resize / min(w, h)
    size = (resize, int(h * scale + 0.5)) if w <= h else (int(w * scale + 0.5), resize)
    image = image.resize(size, Image.BILINEAR)
    left, top = int((size[0] - crop) / 2 + 0.5), int((size[1] - crop) / 2 + 0.5)
    return np.asarray(image.crop((left, top, left + crop, top + crop)))
