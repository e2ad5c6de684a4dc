"""The linear scaling rule, and the DeepSpeed configurations it generates (ds_configs/*.json).

    python -m pipeline.scaling --out ds_configs           # write every committed configuration
    python -m pipeline.scaling --check ds_configs         # exit 1 if a committed file differs
    python -m pipeline.scaling --batch-size 4096 --precision bf16 --out my.json   # one custom file

Goyal et al. 2017: lr = 0.1 * B / 256, reached by a linear warmup over 5 epochs of optimizer steps, then
decayed; every other hyper-parameter stays the same at every batch size. Each file holds the design's schedule
as DeepSpeed's `WarmupDecayLR`: linear warmup from 0 (`warmup_min_lr`, also where its decay ends) to the peak,
then linearly to 0 at the last step, counted on ImageNet-1k over 90 epochs (a run fits the counts to its own
data and epochs: pipeline/schedule.py). The per-GPU micro-batch is the batch-norm batch (32 in the paper);
gradient accumulation makes up the rest of B, and DeepSpeed derives it from the world size at start.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

# ILSVRC2012 training images and the paper's epochs: the committed files count their steps in these. Runs fit the
# counts to their own data and epochs.
IMAGENET_TRAIN_IMAGES, RECIPE_EPOCHS = 1_281_167, 90
# Goyal et al.: 5 epochs of gradual warmup in a 90-epoch run.
WARMUP_EPOCHS = 5.0
REFERENCE_BATCH, REFERENCE_LR = 256, 0.1
# fp16/bf16: DeepSpeed's wrapper (16-bit weights, fp32 masters); autocast-*: fp32 weights under torch.autocast,
# fp16 with torch's GradScaler (pipeline/deepspeed_json.py says what each keeps in which precision).
# auto: bf16 where the host computes it natively, fp32 elsewhere (settled at start: deepspeed_json.resolve_auto_bf16).
PRECISIONS = ("fp16", "bf16", "fp32", "autocast-fp16", "autocast-bf16", "auto")
# The modes with a dynamic loss scale (fp16 overflows are skipped steps, not faults).
LOSS_SCALED = ("fp16", "autocast-fp16")


@dataclass(frozen=True)
class Recipe:
    """One point of the large-minibatch recipe: everything a DeepSpeed configuration holds."""

    # Images per optimizer step over all ranks (B in the paper).
    batch_size: int
    # Images per rank per forward pass: the batch-norm batch, not a distributed-training knob.
    micro_batch: int = 32
    # fp16 (DeepSpeed's wrapper: dynamic loss scaling, fp32 master weights), bf16, fp32, or autocast-fp16 /
    # autocast-bf16 (DeepSpeed's torch_autocast: plain PyTorch AMP's numerics), or auto (bf16 where the host has
    # native bf16, else fp32).
    precision: str = "fp16"
    # Epochs of the schedule and of its warmup.
    epochs: int = RECIPE_EPOCHS
    warmup_epochs: float = WARMUP_EPOCHS
    # Training images per epoch.
    train_images: int = IMAGENET_TRAIN_IMAGES
    # SGD with Nesterov momentum; weight decay applies to conv and linear weights only (see model.py).
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # torch's fused SGD kernels (CUDA); off for CPU configurations.
    fused: bool = True
    # The rule's anchor: lr `reference_lr` at batch `reference_batch` (0.1 at 256 in the paper).
    reference_batch: int = REFERENCE_BATCH
    reference_lr: float = REFERENCE_LR

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.batch_size < 1 or self.micro_batch < 1 or self.batch_size % self.micro_batch:
            raise ValueError(
                f"batch size {self.batch_size} is not a positive multiple of the micro-batch {self.micro_batch}"
            )
        if self.epochs < 1 or not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs} must lie in [0, epochs={self.epochs})")
        if self.reference_batch < 1 or self.reference_lr <= 0:
            raise ValueError(f"reference lr {self.reference_lr} at batch {self.reference_batch}: both must be positive")

    @property
    def peak_lr(self) -> float:
        """The linear scaling rule: 0.1 per 256 images of batch (reference_lr per reference_batch)."""
        return self.reference_lr * self.batch_size / self.reference_batch

    @property
    def base_lr(self) -> float:
        """Where the paper's warmup starts (--schedule goyal_steps): the reference lr, or the peak for batches under
        the reference. The design's WarmupDecayLR starts from 0."""
        return min(self.reference_lr, self.peak_lr)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: the last, partial batch of an epoch is still a step."""
        return math.ceil(self.train_images / self.batch_size)

    @property
    def warmup_steps(self) -> int:
        """Optimizer steps of linear warmup."""
        return round(self.warmup_epochs * self.steps_per_epoch)

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole schedule."""
        return self.epochs * self.steps_per_epoch


def warmup_decay_section(r: Recipe) -> dict:
    """The recipe's schedule as DeepSpeed's WarmupDecayLR: linear warmup from 0 to the peak, then linearly to 0 at
    the last step. Numerics: DeepSpeed's default warmup_type is log; the paper's warmup is linear."""
    params = {
        "warmup_min_lr": 0.0,
        "warmup_max_lr": r.peak_lr,
        "warmup_num_steps": r.warmup_steps,
        "total_num_steps": r.total_steps,
        "warmup_type": "linear",
    }
    return {"type": "WarmupDecayLR", "params": params}


def ds_config(r: Recipe) -> dict:
    """The DeepSpeed configuration of a recipe."""
    sgd = {"lr": r.peak_lr, "momentum": r.momentum, "nesterov": True, "weight_decay": r.weight_decay}
    if r.fused:
        sgd["fused"] = True
    config = {
        "train_batch_size": r.batch_size,
        "train_micro_batch_size_per_gpu": r.micro_batch,
        "steps_per_print": 10**9,
        "optimizer": {"type": "SGD", "params": sgd},
        "scheduler": warmup_decay_section(r),
        "gradient_clipping": 0.0,
        "wall_clock_breakdown": False,
        # Sync: the throughput timer is on by default and synchronises the device twice per micro-step.
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }
    if r.precision == "fp16":
        # loss_scale 0: dynamic loss scaling, starting at 2^16 and halving on every overflow.
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000}
    elif r.precision in ("bf16", "auto"):
        config["bf16"] = {"enabled": True if r.precision == "bf16" else "auto"}
    if r.precision in ("fp16", "bf16", "auto"):
        # The wrapper's gradients are all-reduced in fp32: its default, the 16-bit type, would round batch norm's
        # fp32 gradients and sum the ranks' gradients in 16 bits.
        config["communication_data_type"] = "fp32"
    elif r.precision.startswith("autocast-"):
        # fp16 gets torch's GradScaler (starts at 2^16, halves on an overflow, doubles after 2000 clean steps).
        config["torch_autocast"] = {"enabled": True, "dtype": r.precision.removeprefix("autocast-")}
    return config


# The committed configurations: name -> recipe.
CONFIGS = {
    "bs256": Recipe(256),
    "bs1k": Recipe(1024),
    "bs8k": Recipe(8192),
    "bs8k-bf16": Recipe(8192, precision="bf16"),
    # The same batches in DeepSpeed's torch_autocast mode; which fp16 mode is the default is settled on a GPU.
    "bs256-autocast": Recipe(256, precision="autocast-fp16"),
    "bs1k-autocast": Recipe(1024, precision="autocast-fp16"),
    "bs8k-autocast": Recipe(8192, precision="autocast-fp16"),
    # CPU hosts and the demo: bf16 where the processor has bf16 instructions, fp32 elsewhere (pipeline/cpu.py: on
    # other CPUs 16-bit kernels are emulated, about 30x slower than fp32).
    "cpu": Recipe(64, precision="auto", fused=False),
}


def render(config: dict) -> str:
    """The JSON text of a configuration, as committed."""
    return json.dumps(config, indent=2) + "\n"


def stale_files(folder: Path) -> list[str]:
    """Committed configurations in `folder` that are missing or differ from the generator's output."""
    return [
        f"{folder / name}.json"
        for name, recipe in CONFIGS.items()
        if not (folder / f"{name}.json").is_file() or (folder / f"{name}.json").read_text() != render(ds_config(recipe))
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of `python -m pipeline.scaling`."""
    p = argparse.ArgumentParser(prog="python -m pipeline.scaling", description=__doc__.split("\n")[0])
    p.add_argument("--out", help="folder for every committed configuration, or a .json file with --batch-size")
    p.add_argument("--check", metavar="FOLDER", help="exit 1 if the configurations in FOLDER differ from the rule")
    p.add_argument("--batch-size", type=int, help="one custom configuration with this global batch")
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--precision", choices=PRECISIONS, default="fp16")
    p.add_argument("--no-fused", action="store_true", help="leave out fused SGD kernels (CPU hosts)")
    args = p.parse_args(argv)
    if not (args.out or args.check):
        p.error("give --out or --check")
    return args


def main(argv: list[str] | None = None) -> int:
    """Write or check the configurations; bad values end with a one-line error and exit status 2."""
    args = parse_args(argv)
    try:
        if args.check:
            stale = stale_files(Path(args.check))
            for path in stale:
                print(
                    f"{path}: differs from the linear scaling rule; regenerate: python -m pipeline.scaling --out "
                    f"{args.check}",
                    file=sys.stderr,
                )
            return 1 if stale else 0
        if args.batch_size:
            r = Recipe(args.batch_size, args.micro_batch, args.precision, fused=not args.no_fused)
            Path(args.out).write_text(render(ds_config(r)))
            print(f"{args.out}: B={r.batch_size} lr {r.peak_lr:g}, warmup {r.warmup_steps} of {r.total_steps} steps")
            return 0
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for name, r in CONFIGS.items():
            (Path(args.out) / f"{name}.json").write_text(render(ds_config(r)))
            print(
                f"{args.out}/{name}.json: B={r.batch_size} {r.precision} lr {r.peak_lr:g}, "
                f"warmup {r.warmup_steps} of {r.total_steps} steps"
            )
        return 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
