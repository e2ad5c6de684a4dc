"""What happens to each kind of source image: stored byte for byte, re-encoded to RGB JPEG, or skipped."""

import io

import numpy as np
import pytest
from PIL import Image

from data_prep import images
from data_prep.synthetic import jpeg_bytes, png_bytes, quirk_files


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A 500x375 RGB picture with smooth colour regions and noise."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500]
    pixels = np.stack([x / 2, y / 1.5, (x + y) / 3.5], axis=-1) + rng.normal(0, 10, (375, 500, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def decoded(data: bytes) -> Image.Image:
    """Fully decoded image bytes."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize(
    "make, channels",
    [
        (lambda im: jpeg_bytes(im, 90), 3),
        (lambda im: jpeg_bytes(im.convert("L"), 90), 1),
        (lambda im: jpeg_bytes(im, 85, progressive=True), 3),
    ],
    ids=["rgb", "grayscale", "progressive"],
)
def test_valid_jpegs_are_stored_as_they_are(photo, make, channels):
    verdict = images.check(make(photo))
    assert verdict == images.Checked(images.STORE, "", 375, 500, channels)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("_cmyk.JPEG", "CMYK JPEG"),
        ("_ycck.JPEG", "YCCK JPEG"),
        ("_png.JPEG", "PNG image, not JPEG"),
        ("_alpha.png", "PNG image with alpha, not JPEG"),
    ],
)
def test_cmyk_png_and_alpha_become_rgb_jpegs_with_the_same_picture(photo, name, reason):
    source = quirk_files(photo, "")[name]
    verdict = images.check(source)
    assert (verdict.action, verdict.reason, verdict.height, verdict.width, verdict.channels) == (
        images.REENCODE,
        reason,
        375,
        500,
        3,
    )
    out = decoded(images.reencode(source))
    assert (out.format, out.mode, out.size) == ("JPEG", "RGB", (500, 375))
    assert images.check(images.reencode(source)).action == images.STORE
    if name in ("_cmyk.JPEG", "_png.JPEG"):  # same picture as the source: colours must survive the conversion
        small = [np.asarray(im.resize((50, 37), Image.Resampling.BOX), dtype=float) for im in (out, photo)]
        error = np.abs(small[0] - small[1]).mean()  # block means: colour fidelity, not JPEG noise
        assert error < 3, f"mean colour error {error:.1f} after converting {name}"


def test_grayscale_and_16_bit_pngs_become_rgb_without_clipping():
    gray16 = Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16))  # up to 61420
    for source, brightest in (
        (png_bytes(gray16), 61420 // 256),
        (png_bytes(gray16.point(lambda v: v / 256).convert("L")), 239),
    ):
        verdict = images.check(source)
        assert (verdict.action, verdict.channels) == (images.REENCODE, 3)
        out = decoded(images.reencode(source))
        assert out.mode == "RGB"
        assert abs(int(np.asarray(out).max()) - brightest) <= 3


def test_alpha_is_composited_over_white():
    rgba = Image.new("RGBA", (64, 48), (200, 0, 0, 0))  # fully transparent red
    out = decoded(images.reencode(png_bytes(rgba)))
    assert np.asarray(out).min() > 245


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"<html>not found</html>", "not an image"),
        ("truncated", "undecodable: image file is truncated"),
        ("header-only", "undecodable"),
    ],
)
def test_broken_files_are_skipped_with_a_reason(photo, data, reason):
    good = jpeg_bytes(photo, 90)
    data = {"truncated": good[: len(good) - 500], "header-only": good[:300]}.get(data, data)
    verdict = images.check(data)
    assert verdict.action == images.SKIP
    assert verdict.reason.startswith(reason)


def test_resize_shorter_shrinks_large_images_only(photo):
    big = jpeg_bytes(photo, 90)
    verdict = images.check(big, resize_shorter=200)
    assert (verdict.action, verdict.height, verdict.width) == (images.REENCODE, 200, 267)
    assert "resized 500x375 to shorter side 200" in verdict.reason
    assert decoded(images.reencode(big, resize_shorter=200)).size == (267, 200)
    assert images.check(big, resize_shorter=375).action == images.STORE
    portrait = jpeg_bytes(photo.transpose(Image.Transpose.ROTATE_90), 90)
    assert decoded(images.reencode(portrait, resize_shorter=100)).size == (100, 133)


def test_cmyk_resized_keeps_both_reasons(photo):
    verdict = images.check(quirk_files(photo, "")["_cmyk.JPEG"], resize_shorter=100)
    assert verdict.reason == "CMYK JPEG; resized 500x375 to shorter side 100"
    assert (verdict.width, verdict.height) == (133, 100)
