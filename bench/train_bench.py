"""Benchmark training end to end: DALI batches into the DeepSpeed engine, pipeline/train.py's own epoch loop.

    python bench/train_bench.py [--arch resnet50] [--deepspeed-config FILE] [--micro-batch N]
        [--images 2100] [--epochs 3] [--crop-size 224]

Trains on the generated ImageNet-like photos (500x375, ~110 KB, cached under bench/work/) in one
process: on the GPU when there is one (default ds_configs/bs256.json: fp16, channels-last, DALI on
the GPU), else on the CPU (default ds_configs/cpu.json: bf16, DALI on the CPU). The first epoch
warms up (pipeline start, cuDNN autotuning, allocator); the others are timed. Images/s counts
training images only (no validation). Writes bench/results/<date>-train-<device>-<host>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import BENCH, bench_tree, machine, write_results  # noqa: E402
from bench.data_bench import bench_shards  # noqa: E402
from pipeline import train  # noqa: E402
from pipeline.tracking import Tracker  # noqa: E402


def parse_args() -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    gpu = torch.cuda.is_available()
    p.add_argument("--arch", default="resnet50" if gpu else "resnet18")
    p.add_argument(
        "--deepspeed-config", default=str(BENCH.parent / "ds_configs" / ("bs256.json" if gpu else "cpu.json"))
    )
    p.add_argument("--micro-batch", type=int, help="images per forward pass (default: the configuration's)")
    p.add_argument("--images", type=int, default=2100, help="generated photos (train + 5 per class validation)")
    p.add_argument("--epochs", type=int, default=3, help="epochs; the first is a warm-up")
    p.add_argument("--crop-size", type=int, default=224)
    return p.parse_args()


def ds_config(args: argparse.Namespace, folder: Path) -> str:
    """The configuration to train with: one GPU or process takes the whole batch (by accumulation)."""
    ds = json.loads(Path(args.deepspeed_config).read_text())
    if args.micro_batch:
        ds["train_micro_batch_size_per_gpu"] = args.micro_batch
        ds["train_batch_size"] = max(ds["train_batch_size"] // args.micro_batch, 1) * args.micro_batch
    path = folder / "ds.json"
    path.write_text(json.dumps(ds))
    return str(path)


def main() -> int:
    """Train `epochs` epochs and report images/s of each timed one."""
    args = parse_args()
    shards = bench_shards(bench_tree(args.images))
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--deepspeed_config", ds_config(args, Path(tmp)), "--data-dir", str(shards), "--arch", args.arch,
                "--crop-size", str(args.crop_size), "--val-resize", str(round(args.crop_size * 8 / 7)),
                "--epochs", str(args.epochs), "--warmup-epochs", "0", "--out-dir", tmp,
                "--wandb-mode", "disabled"]  # fmt: skip
        run = train.start(argv)
        if isinstance(run, int):
            return run
        tracker = Tracker(Path(tmp), False, "disabled", "", None, {})
        rates = []
        for epoch in range(args.epochs):
            meter, _ = train.train_epoch(run, epoch, 0, tracker)
            if run.cuda:
                torch.cuda.synchronize()  # a host-device sync point, on purpose: the clock must see the GPU's work
            rates.append(meter.micro_steps * run.micro * run.world / meter.elapsed())
        loss_scale, skipped = train.engine.loss_scale(run.engine), run.engine.skipped_steps
    device = "gpu" if run.cuda else "cpu"
    result = {
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "machine": machine(),
        "device": device,
        "arch": args.arch,
        "precision": run.precision,
        "micro_batch": run.micro,
        "grad_accum": run.accum,
        "crop_size": args.crop_size,
        "train_images": run.data.shards.splits["train"].images,
        "images_per_sec_by_epoch": rates,
        "images_per_sec": statistics.median(rates[1:] or rates),
        "loss_scale": loss_scale,
        "skipped_steps": skipped,
        "threads": int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())),
    }
    text = (
        f"# Training throughput, {result['date']}\n\n`{result['command']}` on {result['machine']['cpu']} "
        f"({result['machine']['cores']} cores), GPU: {result['machine']['gpu']}, torch {result['machine']['torch']}\n\n"
        "| arch | precision | device | micro-batch x accumulation | crop | images/s (median of timed epochs) |\n"
        "|---|---|---|---|---|---|\n"
        f"| {args.arch} | {run.precision} | {device} | {run.micro} x {run.accum} | {args.crop_size} | "
        f"{result['images_per_sec']:.0f} |\n\nPer epoch (the first is the warm-up): "
        + ", ".join(f"{r:.0f}" for r in rates)
        + f"; final loss scale {loss_scale:g}, skipped steps {skipped}.\n"
    )
    write_results(f"train-{device}", result, text)
    train.distributed.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
