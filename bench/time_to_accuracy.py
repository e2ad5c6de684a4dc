"""Time to accuracy on a CPU proxy: a 90-epoch-style recipe against a budgeted one with FFCV's levers, and each
lever alone.

    python bench/time_to_accuracy.py [--seeds 0,1] [--ablation-seed 0] [--epochs 16] [--budget-epochs 8]
        [--classes 20] [--train-per-class 60] [--val-per-class 20] [--work DIR] [--results DIR]

The proxy is the built-in generator's harder mode (`data_prep.synthetic --fine`): a random hue, and classes of one
shape told apart only by a fine texture that a small crop loses, so resolution matters. ResNet-18 on
ds_configs/cpu.json (B = 64), 64 px training crops:
- baseline: `--epochs` epochs of the paper's recipe (goyal_steps: warmup, then x0.1 at 30/60/80 of 90 scaled),
  validated at 64 of 73 px;
- budget: `--budget-epochs` epochs of FFCV's recipe scaled to the proxy: WarmupDecayLR (linear to 0), label
  smoothing 0.1, BlurPool, progressive resizing 56 to 64 px (FFCV's 160/192) over the epochs FFCV's 16-epoch
  recipe ramps in (11 to 13 of 16), validation at 80 of 92 px (FFCV's 256/192) with mirror images.
The ablation adds one lever at a time to the budget's schedule without levers (`short`), plus an EMA of the
weights (Mosaic's) that the FFCV recipe does not use.

Time to accuracy: a run's training and validation wall time (its epoch rows' train_wall_s) until its first
validation at or above the baseline's final top-1 minus 1 point; the headline is the budget's time over the
baseline's, per seed (the goal: 0.5 or less). Runs one after another on this machine, nothing else running.
Writes bench/results/<date>-<device>-time-to-accuracy.json and .md after every run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench.common import BENCH, machine  # noqa: E402
from bench.report import device_name, device_slug  # noqa: E402
from pipeline.launch import without_launcher  # noqa: E402

CROP, VAL_RESIZE = 64, 73
# ds_configs/cpu.json's global batch.
BATCH = 64


def levers(a: argparse.Namespace) -> dict[str, list[str]]:
    """Each lever's flags at the proxy's scale (FFCV's proportions)."""
    start, end = round(11 / 16 * a.budget_epochs), round(13 / 16 * a.budget_epochs)
    # An average with a half-life of about one epoch of optimizer steps at cpu.json's B = 64.
    steps_per_epoch = math.ceil(a.classes * a.train_per_class / BATCH)
    return {
        "label smoothing 0.1": ["--label-smoothing", "0.1"],
        "BlurPool": ["--blurpool"],
        "progressive resizing 56-64": [
            "--ramp-start-size",
            "56",
            "--ramp-start-epoch",
            str(start),
            "--ramp-end-epoch",
            str(end),
            "--ramp-rounding",
            "8",
        ],
        "validation at 80 of 92, flip": ["--val-crop-size", "80", "--val-resize", "92", "--val-flip"],
        "EMA (half-life 1 epoch)": ["--ema-decay", f"{0.5 ** (1 / steps_per_epoch):.4f}"],
    }


def runs(a: argparse.Namespace) -> dict[str, list[str]]:
    """Every run's flags beyond the common ones."""
    short = ["--epochs", str(a.budget_epochs), "--warmup-epochs", "1"]
    lever = levers(a)
    ffcv = [flag for name, flags in lever.items() if not name.startswith("EMA") for flag in flags]
    return {
        "baseline": ["--epochs", str(a.epochs), "--schedule", "goyal_steps", "--warmup-epochs", "1"],
        "budget": [*short, *ffcv],
        "short": short,
        **{f"short + {name}": [*short, *flags] for name, flags in lever.items()},
    }


def prepare(a: argparse.Namespace) -> Path:
    """The proxy's shards, generated and prepared once under the work folder."""
    raw, shards = a.work / "raw", a.work / "shards"
    if not (shards / "manifest.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "data_prep.synthetic",
                "--out",
                str(raw),
                "--fine",
                "--classes",
                str(a.classes),
                "--train-per-class",
                str(a.train_per_class),
                "--val-per-class",
                str(a.val_per_class),
                "--min-side",
                "128",
                "--max-side",
                "192",
            ],
            check=True,
            cwd=ROOT,
        )
        subprocess.run(
            [
                sys.executable,
                "-m",
                "data_prep.imagenet",
                "--src",
                str(raw),
                "--out",
                str(shards),
                "--train-shards",
                "8",
                "--val-shards",
                "4",
                "--workers",
                "2",
            ],
            check=True,
            cwd=ROOT,
        )
    return shards


def train(a: argparse.Namespace, shards: Path, name: str, flags: list[str], seed: int) -> list[dict]:
    """One run of pipeline/train.py; its epoch rows."""
    out = a.work / "runs" / f"{name.replace(' ', '_').replace('/', '-')}-seed{seed}"
    command = [
        sys.executable,
        "pipeline/train.py",
        "--deepspeed_config",
        "ds_configs/cpu.json",
        "--data-dir",
        str(shards),
        "--arch",
        "resnet18",
        "--crop-size",
        str(CROP),
        "--val-resize",
        str(VAL_RESIZE),
        "--seed",
        str(seed),
        "--out-dir",
        str(out),
        "--wandb-mode",
        "disabled",
        "--keep-checkpoints",
        "1",
        *flags,
    ]
    # A finished run of the same command is reused (a run cut short, or of other flags, runs again).
    done = out / "command.json"
    if not done.exists() or json.loads(done.read_text()) != command[1:]:
        shutil.rmtree(out, ignore_errors=True)
        print(f"{name}, seed {seed}: {shlex.join(command)}", flush=True)
        subprocess.run(command, check=True, cwd=ROOT, env=without_launcher(os.environ), stdout=subprocess.DEVNULL)
        done.write_text(json.dumps(command[1:]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "epoch" in r]


def time_to(rows: list[dict], target: float) -> float | None:
    """Wall seconds until the first validation at or above `target` (None: never)."""
    return next((r["train_wall_s"] for r in rows if r["val_top1"] is not None and r["val_top1"] >= target), None)


def report(result: dict) -> str:
    """The results as markdown."""
    lines = [
        f"# Time to accuracy on a CPU proxy ({result['date']})",
        "",
        f"Command: `{result['command']}`",
        f"Machine: {device_name(result['machine'])}; torch {result['machine'].get('torch')}.",
        f"Proxy: {result['proxy']}.",
        "",
        "| seed | baseline final top-1 | target (-1 point) | baseline time to target | budget final top-1 | "
        "budget time to target | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for seed, h in result["headline"].items():
        ratio = f"**{h['ratio']:.2f}**" if h["ratio"] is not None else "not reached"
        budget_t = f"{h['budget_s']:.0f} s" if h["budget_s"] is not None else "not reached"
        lines.append(
            f"| {seed} | {h['baseline_top1']:.1f}% | {h['target']:.1f}% | {h['baseline_s']:.0f} s | "
            f"{h['budget_top1']:.1f}% | {budget_t} | {ratio} |"
        )
    lines += [
        "",
        f"Ablation (seed {result['ablation_seed']}): the budget's schedule without levers (`short`), then one lever at "
        "a time; time to the baseline's target as above.",
        "",
        "| run | final top-1 | best top-1 | time to target | whole run | epochs |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in result["ablation"].items():
        to = f"{r['time_s']:.0f} s" if r["time_s"] is not None else "not reached"
        extra = f" (EMA {r['final_top1_ema']:.1f}%)" if r.get("final_top1_ema") is not None else ""
        lines.append(
            f"| {name} | {r['final_top1']:.1f}%{extra} | {r['best_top1']:.1f}% | {to} | {r['wall_s']:.0f} s | "
            f"{r['epochs']} |"
        )
    return "\n".join(lines) + "\n"


def summary(rows: list[dict], target: float) -> dict:
    last = rows[-1]
    return {
        "final_top1": last["val_top1"],
        "final_top1_ema": last.get("val_top1_ema"),
        "best_top1": max(r["val_top1"] for r in rows if r["val_top1"] is not None),
        "time_s": time_to(rows, target),
        "wall_s": last["train_wall_s"],
        "epochs": len(rows),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/time_to_accuracy.py", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1", help="seeds of the baseline-against-budget comparison")
    p.add_argument("--ablation-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=16, help="the baseline's epochs")
    p.add_argument("--budget-epochs", type=int, default=8)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--train-per-class", type=int, default=60)
    p.add_argument("--val-per-class", type=int, default=20)
    p.add_argument("--work", type=Path, default=BENCH / "work" / "time-to-accuracy")
    p.add_argument("--results", type=Path, default=BENCH / "results")
    a = p.parse_args(argv)
    shards = prepare(a)
    info = machine()
    result = {
        "date": datetime.date.today().isoformat(),
        "command": shlex.join(["python", "bench/time_to_accuracy.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": info,
        "proxy": f"data_prep.synthetic --fine, {a.classes} classes, {a.train_per_class} training and "
        f"{a.val_per_class} validation images per class, 128-192 px; ResNet-18 at {CROP} px, cpu.json (B = 64)",
        "runs": {name: flags for name, flags in runs(a).items()},
        "headline": {},
        "ablation": {},
        "ablation_seed": a.ablation_seed,
    }
    stem = a.results / f"{result['date']}-{device_slug(info)}-time-to-accuracy"
    a.results.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        Path(f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        Path(f"{stem}.md").write_text(report(result))

    plan = runs(a)
    for seed in map(int, a.seeds.split(",")):
        base = train(a, shards, "baseline", plan["baseline"], seed)
        target = base[-1]["val_top1"] - 1
        budget = train(a, shards, "budget", plan["budget"], seed)
        t_base, t_budget = time_to(base, target), time_to(budget, target)
        result["headline"][str(seed)] = {
            "baseline_top1": base[-1]["val_top1"],
            "target": target,
            "baseline_s": t_base,
            "budget_top1": budget[-1]["val_top1"],
            "budget_s": t_budget,
            "ratio": t_budget / t_base if t_budget is not None else None,
        }
        write()
        if seed == a.ablation_seed:
            for name in ("baseline", "budget", *(n for n in plan if n.startswith("short"))):
                rows = train(a, shards, name, plan[name], seed)
                result["ablation"][name] = summary(rows, target)
                write()
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
