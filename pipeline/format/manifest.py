"""`manifest.json`, what data_prep recorded about a shard set, read through one typed loader."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.format.layout import MANIFEST


class ManifestError(ValueError):
    """manifest.json cannot be read; the message names the file and the fix."""


@dataclass(frozen=True)
class ShardEntry:
    """One shard as written: its file name, records, bytes and sha256."""

    file: str
    records: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The parts of manifest.json that readers rely on; `raw` is the whole record (skips, re-encodes, settings)."""

    path: Path
    label_base: int
    num_classes: int
    # Per split: its image count and its shards in order.
    images: dict[str, int]
    shards: dict[str, tuple[ShardEntry, ...]]
    settings: dict
    raw: dict

    @property
    def label_max(self) -> int:
        return self.label_base + self.num_classes - 1

    def all_shards(self) -> list[ShardEntry]:
        return [s for split in self.shards.values() for s in split]


def load(folder: Path) -> Manifest | None:
    """The manifest of a shard folder, or None when it has none (third-party shards)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        splits = raw["splits"]
        return Manifest(
            path,
            int(raw["label_base"]),
            int(raw["num_classes"]),
            images={name: int(s["images"]) for name, s in splits.items()},
            shards={
                name: tuple(
                    ShardEntry(e["file"], int(e["records"]), int(e["bytes"]), e["sha256"]) for e in s.get("shards", ())
                )
                for name, s in splits.items()
            },
            settings=raw.get("settings", {}),
            raw=raw,
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ManifestError(
            f"{path}: not a manifest this version reads ({type(e).__name__}: {e}); rebuild the shards with "
            "make prep-imagenet, or remove it to read them as third-party shards"
        ) from e
