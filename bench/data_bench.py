"""Benchmark the training input pipeline alone: ours (DALI) next to a torchvision DataLoader, same images, same cores.

    python bench/data_bench.py [--images 2100] [--workers N] [--batch 128] [--epochs 3] [--device auto|cpu|gpu]

Both read the same generated photos (500x375, ~110 KB, cached under bench/work/) and make batches
of normalised 224x224 random-resized crops with random flips:
  - dali: `pipeline.data.ImageNetData` training epochs over TFRecord shards of those photos (data_prep
    stores valid JPEGs byte for byte), DALI on the CPU with `workers` threads, or on the GPU
    (nvJPEG, fp16 NHWC batches, as training uses them);
  - torchvision: ImageFolder + PIL + transforms.v2 (RandomResizedCrop, RandomHorizontalFlip, ToImage,
    ToDtype, Normalize) in a DataLoader with `workers` worker processes (pinned and copied to the GPU
    when benchmarking the GPU).
Images/s over `epochs` epochs after one warm-up epoch, median of `repeats` alternating runs; for
DALI also the steady rate within epochs (without the per-epoch pipeline start).
Writes bench/results/<date>-data-<device>-<host>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import BENCH, bench_tree, machine, write_results  # noqa: E402
from data_prep.imagenet import prepare  # noqa: E402
from pipeline.data import DataConfig, ImageNetData  # noqa: E402
from pipeline.data.augment import MEAN, STD  # noqa: E402

# CPU: DALI at least twice the torchvision baseline on equal cores. GPU (H100): 10,000 images/s.
CPU_SPEEDUP_TARGET, GPU_TARGET_IMG_S = 2.0, 10_000


def bench_shards(tree: Path) -> Path:
    """TFRecord shards of the generated tree, prepared once."""
    out = BENCH / "work" / f"shards-{tree.name}"
    if not (out / "manifest.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        prepare(str(tree), str(out), train_shards=16, val_shards=2, workers=len(os.sched_getaffinity(0)))
    return out


def sync(gpu: bool) -> None:
    """Wait for the GPU before reading the clock (a host-device sync point, on purpose)."""
    if gpu:
        torch.cuda.synchronize()


def dali_runner(shards: Path, args, gpu: bool):
    """A warmed-up measurement of our training pipeline: images/s overall and within epochs (steady)."""
    config = DataConfig(
        str(shards),
        batch_size=args.batch,
        data_device="gpu" if gpu else "cpu",
        data_threads=args.workers,
        dtype="float16" if gpu else "float32",
        layout="NHWC" if gpu else "NCHW",
    )
    data = ImageNetData(config, splits=("train",))
    for _ in data.train_epoch(0):  # warm-up: first pipeline build, page cache
        pass
    epochs = iter(range(1, 10**6))

    def measure() -> dict:
        images, steady_images, steady_seconds = 0, 0, 0.0
        sync(gpu)
        start = time.perf_counter()
        for epoch in (next(epochs) for _ in range(args.epochs)):
            for step, batch in enumerate(data.train_epoch(epoch)):
                if step == 0:
                    sync(gpu)
                    first = time.perf_counter()
                images += len(batch.labels)
            sync(gpu)
            steady_seconds += time.perf_counter() - first
            steady_images += (data.train_steps - 1) * args.batch
        return {"img_s": images / (time.perf_counter() - start), "steady_img_s": steady_images / steady_seconds}

    return measure


def torchvision_runner(tree: Path, args, gpu: bool):
    """A warmed-up measurement of the usual PyTorch input pipeline on the same photos and process count."""
    from torchvision import datasets
    from torchvision.transforms import v2

    transform = v2.Compose(
        [
            v2.RandomResizedCrop(224, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([m / 255 for m in MEAN], [s / 255 for s in STD]),
        ]
    )
    dataset = datasets.ImageFolder(str(tree / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch, shuffle=True, num_workers=args.workers, pin_memory=gpu, persistent_workers=True
    )
    for _ in loader:  # warm-up: worker start, page cache
        pass

    def measure() -> dict:
        images, start = 0, time.perf_counter()
        for _ in range(args.epochs):
            for batch, _labels in loader:
                if gpu:
                    batch = batch.cuda(non_blocking=True)
                images += len(batch)
        sync(gpu)
        return {"img_s": images / (time.perf_counter() - start)}

    return measure


def median_of(runs: list[dict]) -> dict:
    """Per key, the median over repeats."""
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def markdown(result: dict) -> str:
    """The results as a README-ready table."""
    m, d, t = result["machine"], result["dali"], result["torchvision"]
    rows = [
        "| pipeline | processes/threads | images/s | steady images/s |",
        "|---|---|---|---|",
        f"| DALI (`pipeline.data`, {result['device']}) | {result['workers']} threads | {d['img_s']:.0f} "
        f"| {d['steady_img_s']:.0f} |",
        f"| torchvision DataLoader (PIL, transforms.v2) | {result['workers']} workers | {t['img_s']:.0f} | |",
    ]
    return (
        f"Input pipeline benchmark, {result['date']}, {m['cpu']} ({m['cores']} cores), GPU: {m.get('gpu')}, "
        f"torch {m.get('torch')}, DALI {result['dali_version']}.\n"
        f"{result['images']} train JPEGs of 500x375 px, batch {result['batch']}, median of {result['repeats']} runs of "
        f"{result['epochs']} epochs (DALI and torchvision alternating) after a warm-up epoch; "
        f"command: `{result['command']}`.\n\n" + "\n".join(rows) + "\n\n"
        f"DALI / torchvision: {result['speedup']:.2f}x. {result['verdict']}\n"
    )


def main() -> int:
    """Run both pipelines and write the results."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2100, help="photos in the generated tree")
    p.add_argument(
        "--workers", type=int, default=len(os.sched_getaffinity(0)), help="DALI threads = DataLoader workers"
    )
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2, help="epochs per measurement")
    p.add_argument("--repeats", type=int, default=3, help="measurements of each pipeline, alternating")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    args = p.parse_args()
    gpu = args.device == "gpu" or (args.device == "auto" and torch.cuda.is_available())
    tree = bench_tree(args.images)
    shards = bench_shards(tree)
    import nvidia.dali

    measure_dali, measure_tv = dali_runner(shards, args, gpu), torchvision_runner(tree, args, gpu)
    runs = [(measure_dali(), measure_tv()) for _ in range(args.repeats)]
    dali, tv = median_of([d for d, _ in runs]), median_of([t for _, t in runs])
    speedup = dali["img_s"] / tv["img_s"]
    met = dali["img_s"] >= GPU_TARGET_IMG_S if gpu else speedup >= CPU_SPEEDUP_TARGET
    target = (
        f"{GPU_TARGET_IMG_S:,} images/s on one GPU" if gpu else f"{CPU_SPEEDUP_TARGET:.0f}x torchvision on equal cores"
    )
    verdict = f"Target {target}: {'met' if met else 'NOT met'}."
    result = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "dali_version": nvidia.dali.__version__,
        "device": "gpu" if gpu else "cpu",
        "images": len(list((tree / "train").rglob("*.JPEG"))),
        "batch": args.batch,
        "epochs": args.epochs,
        "repeats": args.repeats,
        "workers": args.workers,
        "runs": runs,
        "dali": dali,
        "torchvision": tv,
        "speedup": speedup,
        "verdict": verdict,
    }
    write_results(f"data-{result['device']}", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
