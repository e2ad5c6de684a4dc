"""Decide what happens to each source image: stored byte for byte, re-encoded as RGB JPEG, or skipped.

Every image is decoded in full once (the validation); only images every decoder cannot read as
RGB/grayscale JPEG (CMYK/YCCK JPEGs, PNGs and other formats, alpha) or that `--resize-shorter`
asks to shrink are re-encoded. Nothing that fails to decode ever reaches a shard.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

# Re-encoded images are written at this JPEG quality (4:2:0, baseline), close to ImageNet's own.
JPEG_QUALITY = 95
# ImageNet's largest images are ~100 Mpx; beyond this Pillow would refuse with a "decompression bomb" error.
Image.MAX_IMAGE_PIXELS = 300_000_000

STORE, REENCODE, SKIP = "store", "reencode", "skip"


@dataclass(frozen=True)
class Checked:
    """The verdict on one source file; height/width/channels describe what will be stored."""

    action: str
    reason: str = ""
    height: int = 0
    width: int = 0
    channels: int = 0


def _shorter_side_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) with the shorter side scaled to `shorter`, aspect ratio kept."""
    if width <= height:
        return shorter, max(1, round(height * shorter / width))
    return max(1, round(width * shorter / height)), shorter


def _decode(data: bytes) -> Image.Image:
    """Open and fully decode image bytes; Pillow raises on empty, truncated or unknown data."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
        image.load()
    return image


def _conversion_reason(image: Image.Image) -> str:
    """Why a decoded image cannot be stored as it is ('' if it can)."""
    if image.format != "JPEG":
        alpha = " with alpha" if _has_alpha(image) else ""
        return f"{image.format} image{alpha}, not JPEG"
    if image.mode == "CMYK":
        # libjpeg reports YCCK (Adobe transform 2) as CMYK after its own colour conversion.
        return "YCCK JPEG" if image.info.get("adobe_transform") == 2 else "CMYK JPEG"
    if image.mode not in ("RGB", "L"):
        return f"{image.mode} JPEG"
    return ""


def _has_alpha(image: Image.Image) -> bool:
    """True for images with an alpha channel or palette transparency."""
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def check(data: bytes, resize_shorter: int | None = None) -> Checked:
    """Decode `data` in full and say whether to store it, re-encode it, or skip it (with the reason)."""
    if not data:
        return Checked(SKIP, "empty file")
    try:
        image = _decode(data)
    except Image.UnidentifiedImageError:
        return Checked(SKIP, "not an image")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        return Checked(SKIP, f"undecodable: {e}")
    width, height = image.size
    reason = _conversion_reason(image)
    if resize_shorter and min(width, height) > resize_shorter:
        reason = reason + "; " if reason else ""
        reason += f"resized {width}x{height} to shorter side {resize_shorter}"
    if reason:
        width, height = _target_size(image, resize_shorter)
        return Checked(REENCODE, reason, height, width, 3)  # re-encoded images are always RGB
    return Checked(STORE, "", height, width, 1 if image.mode == "L" else 3)


def _target_size(image: Image.Image, resize_shorter: int | None) -> tuple[int, int]:
    """(width, height) an image will have once stored."""
    width, height = image.size
    if resize_shorter and min(width, height) > resize_shorter:
        return _shorter_side_size(width, height, resize_shorter)
    return width, height


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB for storage: alpha composited over white, CMYK/YCCK through Pillow's conversion."""
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale PNGs: scale to 8 bits; a plain conversion clips everything above 255.
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def reencode(data: bytes, resize_shorter: int | None = None) -> bytes:
    """The JPEG bytes to store for an image `check` marked REENCODE (same size as it promised)."""
    image = _decode(data)
    size = _target_size(image, resize_shorter)
    image = _to_rgb(image)
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=JPEG_QUALITY, subsampling="4:2:0")
    return out.getvalue()
