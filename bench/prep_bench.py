"""Benchmark data prep on ImageNet-sized JPEGs, next to the I/O floor, in one run.

    python bench/prep_bench.py [--images 2100] [--repeats 3] [--workers 1,2]

Generates (once, cached under bench/work/) a tree of 500x375 JPEGs of ~110 KB, like ImageNet
photos, then measures in images/s, median over repeats:
  - io_floor: the same bytes read and appended to one file (what any prep must at least do);
  - decode_only: a full Pillow decode of every image (the cost of validation alone);
  - prep: `data_prep.imagenet` end to end (check pass with full decode + shard writes), per
    worker count; `per_worker` divides by the workers;
  - the same images packed as image-net.org's downloads (two tars and the devkit, data_prep.pack) and
    prepared from them in place, end to end with the index scan; and the index scan alone (MB/s).
Writes bench/results/<date>-prep-<host>.json and .md with the command, machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import shutil
import statistics
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import BENCH, bench_tree, machine, timed, write_results  # noqa: E402
from data_prep import archives, pack  # noqa: E402
from data_prep.imagenet import prepare  # noqa: E402

TARGET_PER_WORKER = 250


def source_files(root: Path) -> list[Path]:
    """Every image file of the tree."""
    return sorted(p for p in root.rglob("*.JPEG"))


def io_floor(files: list[Path], out: Path) -> None:
    """Read every file and append its bytes to one file, fsynced: the least any prep must do."""
    with open(out, "wb") as f:
        for path in files:
            f.write(path.read_bytes())
        f.flush()
        os.fsync(f.fileno())


def decode_only(files: list[Path]) -> None:
    """Fully decode every image with Pillow, as the check pass does."""
    for path in files:
        with Image.open(io.BytesIO(path.read_bytes())) as image:
            image.load()


def downloads(root: Path) -> Path:
    """The tree packed as image-net.org's three downloads, once (cached beside it)."""
    folder = root.parent / f"{root.name}-downloads"
    if not (folder / ".complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        pack.official(root, folder)
        (folder / ".complete").touch()
    return folder


def index_scan(folder: Path, work: Path) -> None:
    """Index both tars from scratch, as the first step of a prep from the downloads does."""
    shutil.rmtree(work / "index", ignore_errors=True)
    archives.index_tar(folder / archives.TRAIN_TAR, work / "index" / "train.jsonl", nested=True)
    archives.index_tar(folder / archives.VAL_TAR, work / "index" / "val.jsonl", nested=False)


def markdown(result: dict) -> str:
    """The results as a README-ready table."""
    m = result["machine"]
    measured = [
        ("I/O floor (read + append to one file)", 1, result["io_floor_img_s"]),
        ("full decode only (Pillow)", 1, result["decode_only_img_s"]),
        ("index scan of both tars (headers only)", 1, result["index_img_s"]),
        *(("data_prep.imagenet end to end, folders", r["workers"], r["img_s"]) for r in result["prep"]),
        *(("data_prep.imagenet end to end, downloads", r["workers"], r["img_s"]) for r in result["prep_downloads"]),
    ]
    rows = ["| measurement | workers | images/s | images/s per worker |", "|---|---|---|---|"]
    rows += [f"| {name} | {workers} | {img_s:.0f} | {img_s / workers:.0f} |" for name, workers, img_s in measured]
    return (
        f"Data prep benchmark, {result['date']}, {m['cpu']} ({m['cores']} cores), Pillow {m['pillow']} "
        f"(libjpeg-turbo {m['libjpeg_turbo']}).\n"
        f"{result['images']} JPEGs of {result['mean_size']} px, mean {result['mean_kb']:.0f} KB; "
        f"median of {result['repeats']} runs; command: `{result['command']}`.\n"
        f"Downloads: the same images as image-net.org's two tars and devkit ({result['downloads_mb']:.0f} MB), "
        f"read in place; the index scan covers {result['index_mb_s']:.0f} MB/s of archive.\n\n" + "\n".join(rows) + "\n"
    )


def main() -> int:
    """Run every measurement and write the results."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2100, help="images in the generated tree (>= 2000)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", default=f"1,{os.cpu_count()}", help="comma-separated worker counts")
    args = p.parse_args()
    root = bench_tree(args.images)
    files = source_files(root)
    work = BENCH / "work" / "out"
    sizes = [Image.open(f).size for f in files[:200]]
    result = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "images": len(files),
        "mean_size": "x".join(str(round(statistics.mean(s[i] for s in sizes))) for i in (0, 1)),
        "mean_kb": statistics.mean(f.stat().st_size for f in files) / 1e3,
        "repeats": args.repeats,
    }
    work.mkdir(parents=True, exist_ok=True)
    result["io_floor_img_s"] = len(files) / statistics.median(
        timed(lambda: io_floor(files, work / "floor.bin")) for _ in range(args.repeats)
    )
    result["decode_only_img_s"] = len(files) / statistics.median(
        timed(lambda: decode_only(files)) for _ in range(args.repeats)
    )
    packed = downloads(root)
    result["downloads_mb"] = sum(f.stat().st_size for f in packed.glob("ILSVRC2012_*")) / 1e6
    index_s = statistics.median(timed(lambda: index_scan(packed, work)) for _ in range(args.repeats))
    result["index_img_s"] = len(files) / index_s
    result["index_mb_s"] = result["downloads_mb"] / index_s
    sources = {"prep": root, "prep_downloads": packed}
    result.update({key: [] for key in sources})
    for workers in [int(w) for w in args.workers.split(",")]:

        def run(src: Path, workers=workers):
            shutil.rmtree(work / "shards", ignore_errors=True)
            prepare(str(src), str(work / "shards"), train_shards=16, val_shards=4, workers=workers)

        # Folders and downloads alternate, so a machine whose speed drifts weighs on both alike.
        seconds = {key: [] for key in sources}
        for _ in range(args.repeats):
            for key, src in sources.items():
                seconds[key].append(timed(lambda src=src: run(src)))
        for key in sources:
            img_s = len(files) / statistics.median(seconds[key])
            result[key].append({"workers": workers, "img_s": img_s, "per_worker": img_s / workers})
    result["target_per_worker_img_s"] = TARGET_PER_WORKER
    one = next((r for r in result["prep"] if r["workers"] == 1), result["prep"][0])
    result["meets_target"] = one["per_worker"] >= TARGET_PER_WORKER
    write_results("prep", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
