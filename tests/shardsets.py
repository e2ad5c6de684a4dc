"""Small TFRecord shard sets written the way third parties write them, and reading shards back."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.format import example, tfrecord
from tests.pictures import solid


def read_shard(path: Path) -> list[dict]:
    """Every record of a shard, decoded into {feature: first value}."""
    with open(path, "rb") as f:
        return [{k: v[0] for k, v in example.decode(r.data).items()} for r in tfrecord.read_records(f, str(path))]


def shards_of(folder: Path, split: str) -> list[Path]:
    """The shard files of one split, in order."""
    return sorted(p for p in folder.glob(f"{split}-*") if not p.name.endswith(".idx"))


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """{relative path: content} of every file under a folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


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
