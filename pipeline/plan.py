"""The recipe for N GPUs, and how long it would take: the linear scaling rule's numbers and a stated time model.

    python -m pipeline.plan --gpus 8,64,256,1024 [--batch-size B] [--images-per-sec 2470]
                            [--bandwidth-gbps 100] [--overlap 0] [--markdown]
    python -m pipeline.plan --recipe recipes/rn50-16.yaml --gpus 8 [--images-per-sec-at 160:3400,192:2600]

Per optimizer step and GPU: compute = accumulation x micro-batch / (the single-GPU images/s), and a ring
all-reduce of the gradients (fp16, ResNet-50's 25.6M parameters by default) that moves 2 (N-1)/N of them
through each GPU's link at --bandwidth-gbps, plus a per-hop latency. The backward pass is two thirds of a
micro-step's compute; --overlap of the all-reduce hides behind it, never more than the backward pass lasts.
Epoch time = steps per epoch x step time. Every figure is an input: enter your own measured ones.

With --recipe (recipes/*.yaml): its batch (its DeepSpeed configuration's), epochs and warmup, and each epoch at its
training crop's side (progressive resizing): a side's images/s is --images-per-sec-at's figure for it, else the
224 px figure (--images-per-sec) scaled by the pixels, (224 / side)^2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from pipeline.scaling import IMAGENET_TRAIN_IMAGES, RECIPE_EPOCHS, WARMUP_EPOCHS, Recipe

# ResNet-50's trainable parameters; the gradients all-reduced each step are this many fp16 numbers.
RESNET50_PARAMS = 25_557_032
# Goyal et al.: ResNet-50, B = 8192 on 256 Tesla P100s, 90 epochs in one hour.
GOYAL = {"gpus": 256, "batch": 8192, "hours": 1.0}


@dataclass(frozen=True)
class Cluster:
    """The stated time model's inputs."""

    # Training images/s of one GPU at the micro-batch (measured: make bench; or given).
    images_per_sec: float = 2470.0
    # Each GPU's share of the all-reduce link, in gigabits/s.
    bandwidth_gbps: float = 100.0
    # Latency of one ring hop, seconds (2 (N-1) hops per all-reduce).
    hop_latency_s: float = 5e-6
    # Share of the all-reduce that runs while the backward pass computes (0: none, 1: all it can). 0 for our
    # configs: DeepSpeed without ZeRO all-reduces the fused gradient buckets after the backward pass (README:
    # "Gradient all-reduce"); ZeRO stage 1/2's overlap_comm is what would overlap them.
    overlap: float = 0.0
    # Gradient numbers and bytes per number.
    params: int = RESNET50_PARAMS
    grad_bytes: int = 2


@dataclass(frozen=True)
class Plan:
    """The recipe and the projected times at one GPU count (step times at the last epoch's crop side)."""

    gpus: int
    recipe: Recipe
    accumulation: int
    step_s: float
    compute_s: float
    allreduce_s: float
    exposed_s: float
    # Each epoch's seconds (every epoch at step_s without progressive resizing).
    epochs_s: tuple[float, ...] = ()

    @property
    def epoch_s(self) -> float:
        """Seconds per epoch at the last epoch's crop side."""
        return self.recipe.steps_per_epoch * self.step_s

    @property
    def total_s(self) -> float:
        """Seconds for the recipe's epochs."""
        return sum(self.epochs_s) if self.epochs_s else self.recipe.epochs * self.epoch_s


def allreduce_seconds(gpus: int, c: Cluster) -> float:
    """A ring all-reduce of the gradients over `gpus`: 2 (N-1)/N of them through each link, and 2 (N-1) hops."""
    if gpus == 1:
        return 0.0
    moved = 2 * (gpus - 1) / gpus * c.params * c.grad_bytes * 8
    return moved / (c.bandwidth_gbps * 1e9) + 2 * (gpus - 1) * c.hop_latency_s


def project(
    gpus: int,
    batch_size: int | None,
    micro: int,
    c: Cluster,
    epochs: int = RECIPE_EPOCHS,
    warmup_epochs: float = WARMUP_EPOCHS,
    rates: list[float] | None = None,
) -> Plan:
    """The recipe for `gpus` (B = micro x gpus unless given) and its step and epoch times under the model `c`;
    `rates`: each epoch's images/s where progressive resizing changes it (default: c.images_per_sec throughout)."""
    batch = batch_size or micro * gpus
    if batch % (micro * gpus):
        raise ValueError(f"--batch-size {batch}: not a multiple of micro-batch {micro} x {gpus} GPUs")
    recipe = Recipe(batch, micro, epochs=epochs, warmup_epochs=warmup_epochs, train_images=IMAGENET_TRAIN_IMAGES)
    accumulation = batch // (micro * gpus)
    allreduce = allreduce_seconds(gpus, c)

    def step_seconds(images_per_sec: float) -> tuple[float, float, float]:
        compute = accumulation * micro / images_per_sec
        # Only the last micro-step's backward pass overlaps the all-reduce (DeepSpeed reduces at the boundary).
        hidden = min(c.overlap * allreduce, 2 / 3 * micro / images_per_sec)
        return compute + allreduce - hidden, compute, hidden

    rates = rates or [c.images_per_sec] * epochs
    epochs_s = tuple(recipe.steps_per_epoch * step_seconds(rate)[0] for rate in rates)
    step, compute, hidden = step_seconds(rates[-1])
    return Plan(gpus, recipe, accumulation, step, compute, allreduce, allreduce - hidden, epochs_s)


@dataclass(frozen=True)
class RecipeFile:
    """What a recipes/*.yaml file sets for the plan: the batch of its DeepSpeed configuration, its epochs and
    warmup, and each epoch's training crop side."""

    path: str
    batch_size: int
    micro_batch: int
    epochs: int
    warmup_epochs: float
    sides: list[int]

    @classmethod
    def read(cls, path: str) -> RecipeFile:
        from pipeline import config

        run = config.load(["--config", path, "--data-dir", "<any>"])
        ds = config.read_ds_config(run.deepspeed.deepspeed_config)
        epochs, ramp = run.schedule.epochs, run.data.ramp
        # The ramp read at each epoch's number (FFCV's), one step per epoch.
        sides = [ramp.size(e, 1) if ramp else run.data.crop_size for e in range(epochs)]
        warmup = run.schedule.warmup_epochs if run.schedule.warmup_epochs is not None else WARMUP_EPOCHS
        return cls(path, ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], epochs, warmup, sides)


def rate_at(side: int, c: Cluster, measured: dict[int, float]) -> float:
    """One GPU's images/s at a crop side: measured, else the 224 px figure scaled by the pixels."""
    return measured.get(side, c.images_per_sec * (224 / side) ** 2)


def _duration(seconds: float) -> str:
    """1h 02m, 12m 30s or 45.2s."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m {int(seconds % 60):02d}s"
    return f"{seconds:.1f}s"


def plan_table(plans: list[Plan], c: Cluster) -> str:
    """The plans as a markdown table, with Goyal et al.'s hour beside them."""
    lines = [
        "| GPUs | B | accumulation | peak lr | warmup steps | steps/epoch | compute/step | all-reduce/step "
        f"(exposed) | epoch | {plans[0].recipe.epochs} epochs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in plans:
        r = p.recipe
        beyond = " (beyond 8k: LARS, label smoothing)" if r.batch_size > 8192 else ""
        # The committed configurations' WarmupDecayLR warms up from 0 at every batch size.
        warmup = f"{r.warmup_steps:,}"
        lines.append(
            f"| {p.gpus:,} | {r.batch_size:,}{beyond} | {p.accumulation} | {r.peak_lr:g} | {warmup} | "
            f"{r.steps_per_epoch:,} | {1000 * p.compute_s:.1f} ms | {1000 * p.allreduce_s:.1f} ms "
            f"({1000 * p.exposed_s:.1f} ms) | {_duration(p.epoch_s)} | {_duration(p.total_s)} |"
        )
    goyal = Recipe(GOYAL["batch"])
    per_gpu = goyal.epochs * goyal.train_images / (3600 * GOYAL["hours"]) / GOYAL["gpus"]
    lines.append(
        f"| {GOYAL['gpus']} P100s, Goyal et al. (measured) | {goyal.batch_size:,} | 1 | {goyal.peak_lr:g} | "
        f"{goyal.warmup_steps:,} | {goyal.steps_per_epoch} | {per_gpu:.0f} img/s per GPU over the run | | "
        f"{_duration(3600 * GOYAL['hours'] / goyal.epochs)} | {GOYAL['hours']:g}h |"
    )
    grads = f"{c.params / 1e6:.1f}M fp{8 * c.grad_bytes} gradients"
    model = (
        f"Model: {c.images_per_sec:,.0f} img/s per GPU, ring all-reduce of {grads} at {c.bandwidth_gbps:g} Gb/s "
        f"per GPU and {1e6 * c.hop_latency_s:g} us per hop, {100 * c.overlap:.0f}% of it overlapping the "
        "backward pass."
    )
    return "\n".join(lines) + "\n\n" + model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of `python -m pipeline.plan`."""
    p = argparse.ArgumentParser(prog="python -m pipeline.plan", description=__doc__.split("\n")[0])
    p.add_argument("--gpus", default="8,64,256,1024", help="GPU counts, comma-separated")
    p.add_argument("--batch-size", type=int, help="global batch B (default: micro-batch x GPUs, no accumulation)")
    p.add_argument("--micro-batch", type=int, default=32, help="images per GPU per forward pass (the BN batch)")
    p.add_argument("--epochs", type=int, default=RECIPE_EPOCHS)
    p.add_argument(
        "--images-per-sec",
        type=float,
        default=Cluster.images_per_sec,
        help="one GPU's training images/s (default: NVIDIA's 2,470 for ResNet-50 AMP on an A100)",
    )
    p.add_argument(
        "--bandwidth-gbps",
        type=float,
        default=Cluster.bandwidth_gbps,
        help="each GPU's share of the network for the all-reduce, Gb/s",
    )
    p.add_argument("--hop-latency-us", type=float, default=1e6 * Cluster.hop_latency_s)
    p.add_argument(
        "--overlap",
        type=float,
        default=Cluster.overlap,
        help="share of the all-reduce run during the backward pass (0..1)",
    )
    p.add_argument("--params", type=int, default=RESNET50_PARAMS, help="gradient numbers (default: ResNet-50)")
    p.add_argument(
        "--recipe",
        help="a run configuration (recipes/*.yaml): its batch, epochs, warmup and crop sides replace --batch-size, "
        "--micro-batch and --epochs",
    )
    p.add_argument(
        "--images-per-sec-at",
        default="",
        help="measured images/s of one GPU per crop side, e.g. 160:3400,192:2600 (others: --images-per-sec at "
        "224 px scaled by the pixels)",
    )
    return p.parse_args(argv)


def measured_rates(text: str) -> dict[int, float]:
    """--images-per-sec-at's "side:images_per_sec,..." as {side: rate}."""
    rates = {}
    for item in filter(None, text.split(",")):
        side, _, rate = item.partition(":")
        try:
            rates[int(side)] = float(rate)
        except ValueError:
            raise ValueError(
                f"--images-per-sec-at {text}: write side:images_per_sec pairs, e.g. 160:3400,192:2600"
            ) from None
        if rates[int(side)] <= 0:
            raise ValueError(f"--images-per-sec-at {text}: images/s must be positive")
    return rates


def main(argv: list[str] | None = None) -> int:
    """Print the table; bad values end with a one-line error and exit status 2."""
    a = parse_args(argv)
    try:
        if not (0 <= a.overlap <= 1) or a.images_per_sec <= 0 or a.bandwidth_gbps <= 0:
            raise ValueError("--overlap must lie in [0, 1]; --images-per-sec and --bandwidth-gbps must be positive")
        c = Cluster(a.images_per_sec, a.bandwidth_gbps, a.hop_latency_us / 1e6, a.overlap, a.params)
        measured = measured_rates(a.images_per_sec_at)
        if a.recipe:
            r = RecipeFile.read(a.recipe)
            rates = [rate_at(side, c, measured) for side in r.sides]
            gpus = [int(g) for g in a.gpus.split(",")]
            plans = [project(g, r.batch_size, r.micro_batch, c, r.epochs, r.warmup_epochs, rates) for g in gpus]
            sides = ", ".join(f"{side} px: {rate_at(side, c, measured):,.0f} img/s" for side in sorted(set(r.sides)))
            print(f"{a.recipe}: B={r.batch_size}, {r.epochs} epochs, {r.warmup_epochs:g} warmup; per GPU {sides}")
        else:
            plans = [project(int(g), a.batch_size, a.micro_batch, c, a.epochs) for g in a.gpus.split(",")]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan_table(plans, c))
    return 0


if __name__ == "__main__":
    sys.exit(main())
