"""The scaling study: does a large-batch run follow the small-batch run's training curve? (Goyal et al., figure 2)

    python -m pipeline.scaling_study --data-dir DIR --base-batch 32 --batch-sizes 32,256,1024 --epochs 16 \
        --out OUT [--arch resnet18] [--variants rule+warmup,rule,no-rule] [--lars] [--nproc N]

For every batch size B it trains, with the same epochs, seed and data, one run per variant:
- `rule+warmup`: lr = lr0 * B / B0, reached by a linear warmup from lr0 over --warmup-epochs;
- `rule`: the same lr from the first step;
- `no-rule`: lr0 unchanged;
and the base batch B0 once as `baseline` (lr0). `--lars` adds `rule+warmup` with LARS at the largest batch.
Each run is `pipeline/train.py` itself (one process, or --nproc ranks through torchrun), in OUT/runs/<name>/.
The study writes OUT/summary.json, OUT/summary.md (final top-1 table) and OUT/curves.png (training
error against epochs, one panel per batch size over the baseline), and logs them to wandb as one group.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline import cpu, scaling, schedule
from pipeline.launch import free_port, without_launcher
from pipeline.tracking import METRICS, STEPS, wandb_mode

VARIANTS = ("rule+warmup", "rule", "no-rule")
TRAIN = Path(__file__).resolve().parent / "train.py"


@dataclass(frozen=True)
class StudyRun:
    """One training run of the study and the numbers the rule gives it."""

    batch_size: int
    # baseline, rule+warmup, rule or no-rule.
    variant: str
    optimizer: str
    # Peak lr and the warmup that reaches it (from lr0).
    lr: float
    warmup_epochs: float
    # What train.py is told so that its linear scaling rule yields `lr`: lr = reference_lr * B / reference_batch.
    reference_batch: int

    @property
    def name(self) -> str:
        """The run's folder name."""
        return f"b{self.batch_size}-{self.variant}" + ("-lars" if self.optimizer == "lars" else "")


def study_runs(base_batch: int, batch_sizes: list[int], variants: list[str], lr0: float, warmup: float, lars: bool):
    """The study's runs: the baseline, then each variant at each other batch size (and LARS at the largest)."""
    runs = [StudyRun(base_batch, "baseline", "sgd", lr0, 0.0, base_batch)]
    for b in sorted(set(batch_sizes) - {base_batch}):
        scaled = lr0 * b / base_batch
        for v in variants:
            if v == "rule+warmup":
                runs.append(StudyRun(b, v, "sgd", scaled, warmup, base_batch))
            elif v == "rule":
                runs.append(StudyRun(b, v, "sgd", scaled, 0.0, base_batch))
            else:
                runs.append(StudyRun(b, v, "sgd", lr0, 0.0, b))
    if lars:
        b = max(batch_sizes)
        runs.append(StudyRun(b, "rule+warmup", "lars", lr0 * b / base_batch, warmup, base_batch))
    return runs


def train_command(run: StudyRun, args: argparse.Namespace, folder: Path, group: str) -> list[str]:
    """The pipeline/train.py command line of one run (through torchrun for several ranks)."""
    precision = args.precision or ("fp16" if torch.cuda.is_available() else cpu.default_precision())
    # The file counts its schedule's steps as every generated file does (ImageNet, 90 epochs); the run fits them to
    # the data, --epochs and --warmup-epochs.
    recipe = scaling.Recipe(
        run.batch_size,
        args.micro_batch,
        precision,
        fused=torch.cuda.is_available(),
        reference_batch=run.reference_batch,
        reference_lr=args.base_lr,
    )
    (folder / "ds.json").write_text(scaling.render(scaling.ds_config(recipe)))
    flags = [
        "--deepspeed_config",
        str(folder / "ds.json"),
        "--data-dir",
        args.data_dir,
        "--arch",
        args.arch,
        "--epochs",
        str(args.epochs),
        "--warmup-epochs",
        str(run.warmup_epochs),
        "--schedule",
        args.schedule,
        "--reference-batch",
        str(run.reference_batch),
        "--reference-lr",
        str(args.base_lr),
        "--optimizer",
        run.optimizer,
        "--crop-size",
        str(args.crop_size),
        "--val-resize",
        str(args.val_resize),
        "--seed",
        str(args.seed),
        "--out-dir",
        str(folder),
        "--save-every-epochs",
        str(args.epochs),
        "--wandb-mode",
        args.wandb_mode,
        "--wandb-project",
        args.wandb_project,
        "--wandb-group",
        group,
    ]
    if args.num_classes:
        flags += ["--num-classes", str(args.num_classes)]
    if args.nproc > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(args.nproc),
            "--master_port",
            str(free_port()),
            str(TRAIN),
            *flags,
        ]
    return [sys.executable, str(TRAIN), *flags]


def train_error_curve(folder: Path, points_per_epoch: int) -> list[list[float]]:
    """[[epoch, training top-1 error %], ...]: steps.jsonl averaged over each 1/points_per_epoch of an epoch."""
    bins: dict[int, list[float]] = {}
    for line in (folder / STEPS).read_text().splitlines():
        row = json.loads(line)
        # A step ending at epoch e falls in the bin ending at the next multiple of 1/points_per_epoch.
        bins.setdefault(math.ceil(round(row["epoch"] * points_per_epoch, 9)), []).append(row["error"])
    return [[k / points_per_epoch, sum(v) / len(v)] for k, v in sorted(bins.items())]


def final_top1(folder: Path) -> float:
    """Validation top-1 after the last epoch, from the run's metrics.jsonl summary line."""
    return json.loads((folder / METRICS).read_text().splitlines()[-1])["last_top1"]


def curve_gap(curve: list[list[float]], baseline: list[list[float]], after: float) -> float | None:
    """Mean absolute difference of two training-error curves at their common points past epoch `after`."""
    base = {round(e, 9): err for e, err in baseline}
    diffs = [abs(err - base[round(e, 9)]) for e, err in curve if e > after and round(e, 9) in base]
    return sum(diffs) / len(diffs) if diffs else None


def summarise(runs: list[StudyRun], out: Path, points_per_epoch: int, warmup: float) -> dict:
    """summary.json's content: each run's settings, final top-1, curve, and its gaps to the baseline."""
    rows = []
    for run in runs:
        folder = out / "runs" / run.name
        rows.append(
            {
                **asdict(run),
                "name": run.name,
                "final_val_top1": final_top1(folder),
                "train_error_curve": train_error_curve(folder, points_per_epoch),
            }
        )
    base = rows[0]
    for row in rows:
        row["gap_to_baseline"] = {
            "final_top1": row["final_val_top1"] - base["final_val_top1"],
            "mean_abs_curve_gap_after_warmup": curve_gap(row["train_error_curve"], base["train_error_curve"], warmup),
        }
    return {"base_batch": base["batch_size"], "base_lr": base["lr"], "warmup_epochs": warmup, "runs": rows}


def summary_table(summary: dict) -> str:
    """summary.md: the final top-1 of every run and its gaps to the baseline."""
    columns = [
        "batch",
        "variant",
        "optimizer",
        "lr",
        "warmup epochs",
        "final val top-1",
        "vs baseline",
        "train-error gap after warmup",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for r in summary["runs"]:
        gap = r["gap_to_baseline"]
        curve = gap["mean_abs_curve_gap_after_warmup"]
        lines.append(
            f"| {r['batch_size']} | {r['variant']} | {r['optimizer']} | {r['lr']:.4g} | {r['warmup_epochs']:g} | "
            f"{r['final_val_top1']:.1f} | {gap['final_top1']:+.1f} | {'-' if curve is None else f'{curve:.1f}'} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """curves.png: training error against epochs, one panel per larger batch, each over the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = summary["runs"][0]
    sizes = sorted({r["batch_size"] for r in summary["runs"][1:]}) or [base["batch_size"]]
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False, sharey=True)
    for ax, b in zip(axes[0], sizes, strict=True):
        ax.plot(
            *zip(*base["train_error_curve"], strict=True),
            color="black",
            lw=2,
            label=f"baseline B={base['batch_size']} ({base['final_val_top1']:.1f}%)",
        )
        for r in (r for r in summary["runs"][1:] if r["batch_size"] == b):
            label = r["variant"] + (" LARS" if r["optimizer"] == "lars" else "") + f" ({r['final_val_top1']:.1f}%)"
            ax.plot(*zip(*r["train_error_curve"], strict=True), lw=1.5, label=label)
        k = b / base["batch_size"]
        ax.set(title=f"B={b} (k={k:g}) vs B={base['batch_size']}", xlabel="epochs", ylim=(0, 100))
        ax.axvline(summary["warmup_epochs"], color="grey", ls=":", lw=1)
        ax.legend(title="variant (final val top-1)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training error %")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_to_wandb(summary: dict, out: Path, args: argparse.Namespace, group: str) -> None:
    """The study's figure and table as one more run in the wandb group of its training runs."""
    if args.wandb_mode == "disabled":
        return
    import wandb

    columns = ["batch", "variant", "optimizer", "lr", "warmup_epochs", "final_val_top1", "gap_final_top1"]
    rows = [
        [
            r["batch_size"],
            r["variant"],
            r["optimizer"],
            r["lr"],
            r["warmup_epochs"],
            r["final_val_top1"],
            r["gap_to_baseline"]["final_top1"],
        ]
        for r in summary["runs"]
    ]
    run = wandb.init(
        project=args.wandb_project,
        group=group,
        name=f"{group}-summary",
        job_type="scaling-study",
        dir=str(out),
        mode=args.wandb_mode,
        config=vars(args),
    )
    run.log({"curves": wandb.Image(str(out / "curves.png")), "summary": wandb.Table(columns=columns, data=rows)})
    run.finish()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of `python -m pipeline.scaling_study`."""
    p = argparse.ArgumentParser(prog="python -m pipeline.scaling_study", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--base-batch", type=int, required=True, help="B0, the baseline's batch")
    p.add_argument("--batch-sizes", required=True, help="comma-separated batch sizes, e.g. 32,256,1024")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--out", required=True, help="study folder (runs/, summary.json, summary.md, curves.png)")
    p.add_argument("--base-lr", type=float, help="lr0 at B0 (default: the paper's rule, 0.1 * B0 / 256)")
    p.add_argument("--warmup-epochs", type=float, default=2.0, help="warmup of the rule+warmup variant")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--lars", action="store_true", help="also rule+warmup with LARS at the largest batch")
    p.add_argument("--schedule", choices=tuple(schedule.KINDS), default=schedule.GOYAL)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--crop-size", type=int, default=224)
    p.add_argument("--val-resize", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=32, help="images per forward pass (the BN batch)")
    p.add_argument(
        "--precision",
        choices=("fp16", "bf16", "fp32"),
        help="default: fp16 on a GPU; on a CPU bf16 where it is native, else fp32",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=1, help="ranks per run (torchrun), e.g. the GPUs of this host")
    p.add_argument("--points-per-epoch", type=int, default=4, help="training-error curve resolution")
    p.add_argument("--wandb-mode", choices=("online", "offline", "disabled"))
    p.add_argument("--wandb-project", default="imagenet-pipeline")
    p.add_argument("--wandb-group", help="default: scaling-study-<out folder name>")
    args = p.parse_args(argv)
    args.wandb_mode = wandb_mode(args.wandb_mode)
    return args


def check(args: argparse.Namespace) -> tuple[list[int], list[str]]:
    """Batch sizes and variants from the command line, or a ValueError naming the bad value."""
    try:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError as e:
        raise ValueError(f"--batch-sizes {args.batch_sizes}: expected comma-separated integers") from e
    variants = args.variants.split(",")
    if set(variants) - set(VARIANTS):
        raise ValueError(f"--variants {args.variants}: choose from {', '.join(VARIANTS)}")
    if args.nproc < 1:
        raise ValueError(f"--nproc {args.nproc}: must be at least 1")
    for b in sorted({args.base_batch, *sizes}):
        if b < 1 or b % (args.micro_batch * args.nproc):
            raise ValueError(
                f"batch size {b} is not a positive multiple of --micro-batch {args.micro_batch} x "
                f"--nproc {args.nproc}; lower --micro-batch or choose batch sizes it divides"
            )
    if args.base_batch not in sizes or max(sizes) <= args.base_batch:
        raise ValueError(f"--batch-sizes {args.batch_sizes}: include --base-batch {args.base_batch} and a larger one")
    if not 0 <= args.warmup_epochs < args.epochs:
        raise ValueError(f"--warmup-epochs {args.warmup_epochs}: must lie in [0, --epochs {args.epochs})")
    return sizes, variants


def main(argv: list[str] | None = None) -> int:
    """Run every training of the study, then summarise, plot and log; bad input exits with status 2."""
    args = parse_args(argv)
    try:
        sizes, variants = check(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.base_lr = args.base_lr or scaling.REFERENCE_LR * args.base_batch / scaling.REFERENCE_BATCH
    out = Path(args.out)
    group = args.wandb_group or f"scaling-study-{out.resolve().name}"
    runs = study_runs(args.base_batch, sizes, variants, args.base_lr, args.warmup_epochs, args.lars)
    for i, run in enumerate(runs, 1):
        folder = out / "runs" / run.name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        print(f"[{i}/{len(runs)}] {run.name}: lr {run.lr:.4g}, warmup {run.warmup_epochs:g} epochs", flush=True)
        # Each run forms its own process group: rendezvous variables inherited from a launcher are not for it.
        # wandb names the run after its variant (train.py would name every variant of one batch the same).
        env = {**without_launcher(os.environ), "PYTHONPATH": str(TRAIN.parent.parent), "WANDB_NAME": run.name}
        proc = subprocess.run(
            train_command(run, args, folder, group),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        (folder / "train.log").write_text(proc.stdout)
        if proc.returncode != 0:
            print(f"error: {run.name} failed (exit {proc.returncode}); its output is in {folder / 'train.log'}")
            return 1
        lines = proc.stdout.strip().splitlines()
        print("    " + next((x for x in reversed(lines) if x.startswith("done:")), lines[-1]), flush=True)
    summary = summarise(runs, out, args.points_per_epoch, args.warmup_epochs)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(summary_table(summary))
    plot(summary, out / "curves.png")
    log_to_wandb(summary, out, args, group)
    print(summary_table(summary) + f"written: {out / 'summary.json'}, {out / 'summary.md'}, {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
