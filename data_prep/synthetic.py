"""Write an ImageNet-layout folder of real JPEG files with a learnable task, for the demo and tests.

    python -m data_prep.synthetic --out DIR [--classes 10] [--train-per-class 100] [--val-per-class 20]
        [--min-side 96] [--max-side 192] [--val-layout {folders,flat}] [--quirks] [--fine] [--seed 0]
        [--pack {official,kaggle}]

Each class has its own hue and shape (disc, square, triangle, stripes), drawn at a random place and
scale over a noisy, shaded background, so classes differ visibly and survive random-resized crops.
Sizes and aspect ratios vary like photos. `--quirks` adds ImageNet's known oddities and broken
files (CMYK and YCCK JPEGs, PNG named .JPEG, alpha PNG, grayscale, progressive, empty, truncated, non-image).
`--fine` is a harder mode where resolution matters (bench/time_to_accuracy.py): the hue is random, and classes of
one shape differ only in a fine texture that a small crop loses.
`--pack` writes the folder as the downloads instead (data_prep.pack): image-net.org's two tars and devkit, or
Kaggle's zip.
"""

from __future__ import annotations

import argparse
import colorsys
import io
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_prep import pack

# Photo aspect ratios (width / height): landscape and portrait camera formats and squares.
ASPECTS = (4 / 3, 3 / 4, 3 / 2, 2 / 3, 1.0, 16 / 9)
SHAPES = ("disc", "square", "triangle", "stripes")


def wnid(k: int) -> str:
    """A WordNet-style id for synthetic class k."""
    return f"n{10000000 + k:08d}"


def render(
    k: int,
    classes: int,
    rng: np.random.Generator,
    min_side: int,
    max_side: int,
    noise: float,
    aspects: tuple[float, ...] = ASPECTS,
) -> Image.Image:
    """One RGB picture of class k: class hue and shape, random size, placement, shading and noise."""
    aspect = aspects[rng.integers(len(aspects))]
    short = int(rng.integers(min_side, max_side + 1))
    w, h = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
    hue = (k / classes + rng.normal(0, 0.01)) % 1.0
    base = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.5, 0.9), rng.uniform(0.55, 0.95))) * 255
    shade = np.linspace(rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0), h)[:, None, None]
    pixels = base[None, None, :] * shade + rng.normal(0, noise, (h, w, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    # The shape is a dark shade of the class hue: a complementary hue would be another class's background.
    fg = tuple(int(c * 255) for c in colorsys.hsv_to_rgb(hue, 0.9, rng.uniform(0.15, 0.4)))
    _draw_shape(ImageDraw.Draw(image), SHAPES[k % len(SHAPES)], w, h, fg, rng)
    return image


# --fine: the textures that tell classes of one shape apart, (period in pixels, angle in degrees). The periods are
# those of the full picture (96 to 192 px): a crop resized to 32-64 px keeps only the coarsest, so a model sees
# more of the classes at a larger crop (what progressive resizing and testing at a larger size trade on).
TEXTURES = ((3, 0), (3, 90), (5, 45), (5, 135), (8, 0), (8, 90), (13, 45), (13, 135))


def render_fine(
    k: int, rng: np.random.Generator, min_side: int, max_side: int, noise: float, aspects: tuple[float, ...] = ASPECTS
) -> Image.Image:
    """One RGB picture of class k in the harder mode: a random hue (no class signal), the class shape (k mod 4)
    filled with the class texture (k div 4: a grating of TEXTURES' period and angle) over a noisy background."""
    aspect = aspects[rng.integers(len(aspects))]
    short = int(rng.integers(min_side, max_side + 1))
    w, h = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
    hue = rng.uniform()
    base = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.3, 0.7), rng.uniform(0.6, 0.9))) * 255
    pixels = np.broadcast_to(base, (h, w, 3)) + rng.normal(0, noise, (h, w, 3))
    period, angle = TEXTURES[(k // len(SHAPES)) % len(TEXTURES)]
    y, x = np.mgrid[0:h, 0:w]
    phase = (x * np.cos(np.radians(angle)) + y * np.sin(np.radians(angle))) * 2 * np.pi / period
    grating = (np.sin(phase + rng.uniform(0, 2 * np.pi)) > 0)[:, :, None]
    dark, light = base * 0.25, np.minimum(base * 1.1 + 40, 255)
    mask = Image.new("L", (w, h), 0)
    _draw_shape(ImageDraw.Draw(mask), SHAPES[k % len(SHAPES)], w, h, 255, rng)
    inside = (np.asarray(mask) > 0)[:, :, None]
    pixels = np.where(inside, np.where(grating, light, dark), pixels)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, w: int, h: int, fill: tuple, rng: np.random.Generator) -> None:
    """Draw the class shape at a random position covering roughly 20-50% of the shorter side."""
    r = min(w, h) * rng.uniform(0.2, 0.5)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    if shape == "disc":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        step = max(4, int(r / 3))
        for x in range(0, w, 2 * step):
            draw.rectangle((x, 0, x + step - 1, h), fill=fill)


def jpeg_bytes(image: Image.Image, quality: int, **options) -> bytes:
    """Encode an image as JPEG."""
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality, **options)
    return out.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    """Encode an image as PNG."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def ycck_bytes(image: Image.Image) -> bytes:
    """A YCCK JPEG: a CMYK JPEG whose Adobe APP14 transform flag says YCCK (2); colours shift, structure is real."""
    cmyk = jpeg_bytes(image.convert("CMYK"), 90)
    transform = cmyk.index(b"Adobe") + 11  # "Adobe", version (2 bytes), flags0 (2), flags1 (2), transform (1)
    return cmyk[:transform] + b"\x02" + cmyk[transform + 1 :]


def quirk_files(image: Image.Image, stem: str) -> dict[str, bytes]:
    """ImageNet's oddities and broken files, made from one picture: {file name: bytes}."""
    good = jpeg_bytes(image, 90)
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(image.size))
    return {
        f"{stem}_cmyk.JPEG": jpeg_bytes(image.convert("CMYK"), 90),
        f"{stem}_ycck.JPEG": ycck_bytes(image),
        f"{stem}_png.JPEG": png_bytes(image),
        f"{stem}_alpha.png": png_bytes(rgba),
        f"{stem}_gray.JPEG": jpeg_bytes(image.convert("L"), 90),
        f"{stem}_progressive.jpeg": jpeg_bytes(image, 90, progressive=True),
        f"{stem}_lower.jpg": good,
        f"{stem}_upper.PNG": png_bytes(image),
        f"{stem}_empty.JPEG": b"",
        f"{stem}_truncated.JPEG": good[: len(good) // 2],
        f"{stem}_notimage.JPEG": b"<html>this is an error page, not a picture</html>\n",
    }


# Quirks that also go into val/ (under ImageNet validation names, so flat layouts label them too).
VAL_QUIRKS = ("cmyk.JPEG", "gray.JPEG", "png.JPEG", "truncated.JPEG")


def generate(
    out: str,
    classes: int = 10,
    train_per_class: int = 100,
    val_per_class: int = 20,
    min_side: int = 96,
    max_side: int = 192,
    val_layout: str = "folders",
    quirks: bool = False,
    seed: int = 0,
    noise: float = 12.0,
    aspects: tuple[float, ...] = ASPECTS,
    quality: tuple[int, int] = (80, 95),
    fine: bool = False,
) -> Path:
    """Write the folder and return its path (JPEG quality drawn per image from the inclusive range; `fine`: the
    harder mode, render_fine)."""
    root = Path(out)
    lo, hi = quality
    val_files: list[tuple[str, bytes]] = []  # (wnid, JPEG bytes) in validation order
    for k in range(classes):
        rng = np.random.default_rng([seed, k])
        if fine:
            picture = partial(render_fine, k, rng, min_side, max_side, noise, aspects)
        else:
            picture = partial(render, k, classes, rng, min_side, max_side, noise, aspects)
        train_dir = root / "train" / wnid(k)
        train_dir.mkdir(parents=True, exist_ok=True)
        for i in range(train_per_class):
            (train_dir / f"{wnid(k)}_{i}.JPEG").write_bytes(jpeg_bytes(picture(), int(rng.integers(lo, hi + 1))))
        val_files += [(wnid(k), jpeg_bytes(picture(), int(rng.integers(lo, hi + 1)))) for _ in range(val_per_class)]
        if quirks:
            for name, data in quirk_files(picture(), wnid(k)).items():
                (train_dir / name).write_bytes(data)
            odd = quirk_files(picture(), "")
            val_files += [(wnid(k), odd["_" + q]) for q in VAL_QUIRKS]
    if quirks:
        (root / "train" / wnid(0) / "README.txt").write_text("not an image: should be listed as skipped\n")
    _write_val(root, val_files, val_layout)
    return root


def _write_val(root: Path, files: list[tuple[str, bytes]], layout: str) -> None:
    """Write validation images under ImageNet names, in class folders or flat with Kaggle's label CSV."""
    rows = []
    for number, (class_id, data) in enumerate(files, start=1):
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        folder = root / "val" / class_id if layout == "folders" else root / "val"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        rows.append(f"{Path(name).stem},{class_id} 1 1 10 10\n")
    if layout == "flat":
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(rows))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m data_prep.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder to create (train/, val/)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--val-per-class", type=int, default=20)
    p.add_argument("--min-side", type=int, default=96, help="smallest shorter side, pixels")
    p.add_argument("--max-side", type=int, default=192, help="largest shorter side, pixels")
    p.add_argument(
        "--val-layout",
        choices=("folders", "flat"),
        default="folders",
        help="val/<wnid>/* or a flat val/ with Kaggle's LOC_val_solution.csv beside it",
    )
    p.add_argument(
        "--quirks",
        action="store_true",
        help="add CMYK, YCCK, PNG-as-JPEG, alpha, grayscale, progressive, empty, truncated, non-image files",
    )
    p.add_argument(
        "--fine",
        action="store_true",
        help="harder classes: a random hue, the class told by its shape and a fine texture a small crop loses "
        f"(up to {len(SHAPES) * len(TEXTURES)} classes)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pack",
        choices=("official", "kaggle"),
        default=None,
        help="write the downloads instead of folders: image-net.org's two tars and devkit, or Kaggle's zip",
    )
    p.add_argument("--noise", type=float, default=12.0, help="pixel noise std, which sets JPEG size (detail)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    if not 1 <= args.min_side <= args.max_side:
        print(f"error: --min-side {args.min_side} / --max-side {args.max_side}: need 1 <= min <= max", file=sys.stderr)
        return 2
    if args.fine and args.classes > len(SHAPES) * len(TEXTURES):
        print(f"error: --classes {args.classes}: --fine has {len(SHAPES) * len(TEXTURES)} at most", file=sys.stderr)
        return 2
    if args.classes < 1 or args.train_per_class < 1 or args.val_per_class < 1:
        print("error: --classes, --train-per-class and --val-per-class must be at least 1", file=sys.stderr)
        return 2
    options = vars(args)
    pack_as = options.pop("pack")
    if pack_as is None:
        root = generate(**options)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tree = generate(**{**options, "out": tmp, "val_layout": "folders"})
            root = (
                pack.official(tree, Path(args.out), args.seed)
                if pack_as == "official"
                else pack.kaggle(tree, Path(args.out))
            )
    count = sum(1 for p in root.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(f"wrote {count} files ({size / 1e6:.1f} MB) of {args.classes} classes to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
