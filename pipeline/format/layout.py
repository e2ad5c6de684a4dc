"""The names in a shard folder: splits, shard series, DALI index files, the manifest and the label file."""

from __future__ import annotations

import re
from pathlib import Path

SPLITS = ("train", "validation")
MANIFEST, LABELS = "manifest.json", "labels.txt"
# TensorFlow's ImageNet convention, for shards without a manifest: label 0 is "background", the 1000 classes
# are 1..1000.
TF_LABEL_BASE, TF_NUM_CLASSES = 1, 1000
SHARD_NAME = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})$")


def shard_name(split: str, index: int, count: int) -> str:
    """Public TF ImageNet shard naming: train-00000-of-01024."""
    return f"{split}-{index:05d}-of-{count:05d}"


def index_path(shard: Path) -> Path:
    """The DALI index beside a shard: `<shard>.idx`."""
    return shard.with_name(shard.name + ".idx")


def find_shards(folder: Path) -> list[Path]:
    """Shard files named like `train-00000-of-01024` in a folder, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and SHARD_NAME.match(p.name))


def missing_shards(shards: list[Path]) -> list[str]:
    """Names absent from a `prefix-i-of-n` series (a lost shard means lost images)."""
    seen: dict[tuple[str, int], set[int]] = {}
    for p in shards:
        m = SHARD_NAME.match(p.name)
        seen.setdefault((m["prefix"], int(m["count"])), set()).add(int(m["index"]))
    return [
        shard_name(prefix, i, count)
        for (prefix, count), found in sorted(seen.items())
        for i in range(count)
        if i not in found
    ]
