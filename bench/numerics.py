"""16-bit numerics against fp32: one recipe trained once per precision mode on the built-in dataset, compared.

    python bench/numerics.py [--data-dir data/demo/shards] [--modes fp32,fp16,autocast-fp16] [--arch resnet18]
        [--epochs 8] [--crop-size 128] [--val-resize 146] [--batch 64] [--micro-batch 32] [--seed 0]
        [--loss-scale-window 25] [--top1-tolerance 1.0] [--bn-tolerance 0.1] [--results DIR] [--work DIR]

Every run is pipeline/train.py itself with the same seed, data order, schedule and epochs; only the precision
differs. On a GPU the modes are fp32 (with TF32 off: NVIDIA_TF32_OVERRIDE=0, so the reference is true fp32),
DeepSpeed's fp16 wrapper and the autocast fp16 mode (torch's GradScaler). On a CPU they are fp32, bf16 and
autocast-bf16; --fp16-on-cpu runs the fp16 modes there too (DeepSpeed refuses its fp16 wrapper on a CPU:
bench/fp16_cpu_train.py lets it). Without native 16-bit instructions every 16-bit mode is emulated on a CPU,
about 30x slower than fp32 (pipeline/cpu.py): use a small setting there.

The checks:
- each 16-bit run ends within --top1-tolerance points of fp32's final validation top-1;
- each fp16 run's steps.jsonl shows at least one step skipped for overflow and at least one growth of the loss
  scale. The scale doubles after --loss-scale-window clean steps: the committed 1000 (2000 for the GradScaler)
  would show no growth in a run this short, so the default window is 25;
- batch-norm running statistics are finite and close to fp32's: per layer, the size of its running means (RMS)
  and of its running variances (mean) within --bn-tolerance (10%) of fp32's. Channel by channel two runs drift
  apart (16-bit rounding changes the trajectory); that distance is reported, not judged. On this CPU, bf16 against
  fp32 on the demo setting: sizes within 7% (means) and 3% (variances), channel distance 18%.

Writes bench/results/<date>-<device>-numerics.json and .md after every run, so a run cut short keeps its figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench.common import BENCH, machine  # noqa: E402
from bench.report import device_name, device_slug  # noqa: E402
from pipeline import checkpoint, scaling  # noqa: E402
from pipeline.launch import without_launcher  # noqa: E402
from pipeline.scaling import LOSS_SCALED  # noqa: E402
from pipeline.scaling_study import final_top1  # noqa: E402
from pipeline.tracking import STEPS  # noqa: E402

GPU_MODES, CPU_MODES = "fp32,fp16,autocast-fp16", "fp32,bf16,autocast-bf16"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line, with the modes for the device at hand."""
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(ROOT / "data" / "demo" / "shards"), help="shards (make demo-data)")
    p.add_argument("--modes", default=GPU_MODES if gpu else CPU_MODES, help="precision modes, fp32 first")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--crop-size", type=int, default=128)
    p.add_argument("--val-resize", type=int, default=146)
    p.add_argument("--batch", type=int, default=64, help="images per optimizer step")
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss-scale-window", type=int, default=25, help="fp16: clean steps before the scale doubles")
    p.add_argument("--top1-tolerance", type=float, default=1.0, help="points of top-1 a 16-bit run may lose")
    p.add_argument("--bn-tolerance", type=float, default=0.1, help="relative distance of BN statistics to fp32's")
    p.add_argument(
        "--fp16-on-cpu",
        action="store_true",
        help="on a CPU, run the fp16 modes anyway: DeepSpeed's fp16 "
        "wrapper through bench/fp16_cpu_train.py, both with --allow-cpu (slow: emulated fp16)",
    )
    p.add_argument("--results", default=str(BENCH / "results"), help="folder for the results")
    p.add_argument("--work", default=str(BENCH / "work" / "numerics"), help="folder for the runs (emptied first)")
    args = p.parse_args(argv)
    args.modes = args.modes.split(",")
    unknown = [m for m in args.modes if m not in scaling.PRECISIONS]
    if unknown or args.modes[0] != "fp32":
        raise SystemExit(f"error: --modes {','.join(args.modes)}: fp32 first, then some of {scaling.PRECISIONS}")
    if not (Path(args.data_dir) / "manifest.json").exists():
        raise SystemExit(f"error: --data-dir {args.data_dir}: no shards there; build the built-in set: make demo-data")
    return args


def train(args: argparse.Namespace, mode: str, folder: Path) -> tuple[int, list[str]]:
    """pipeline/train.py in `mode`, everything else as in every other mode: its exit status and command."""
    gpu = torch.cuda.is_available()
    # The file counts its schedule's steps on ImageNet at 90 epochs, as every generated file does; the run fits them
    # to the built-in set, --epochs and --warmup-epochs.
    recipe = scaling.Recipe(args.batch, args.micro_batch, mode, fused=gpu)
    folder.mkdir(parents=True)
    (folder / "ds.json").write_text(scaling.render(scaling.ds_config(recipe)))
    fp16_on_cpu = args.fp16_on_cpu and not gpu and mode in LOSS_SCALED
    script = ROOT / ("bench/fp16_cpu_train.py" if fp16_on_cpu else "pipeline/train.py")
    argv = [
        sys.executable,
        str(script),
        "--deepspeed_config",
        str(folder / "ds.json"),
        "--data-dir",
        args.data_dir,
        "--arch",
        args.arch,
        "--epochs",
        str(args.epochs),
        "--warmup-epochs",
        str(args.warmup_epochs),
        "--crop-size",
        str(args.crop_size),
        "--val-resize",
        str(args.val_resize),
        "--seed",
        str(args.seed),
        "--out-dir",
        str(folder / "run"),
        "--save-every-epochs",
        str(args.epochs),
        "--keep-checkpoints",
        "1",
        "--log-every",
        "1",
        "--wandb-mode",
        "disabled",
    ]
    if mode in LOSS_SCALED:
        argv += ["--loss-scale-window", str(args.loss_scale_window)]
    if fp16_on_cpu:
        argv += ["--allow-cpu"]
    # Numerics: TF32 would round fp32 convolutions' inputs to 10 mantissa bits; the reference is true fp32.
    env = {**without_launcher(os.environ), **({"NVIDIA_TF32_OVERRIDE": "0"} if mode == "fp32" and gpu else {})}
    print(f"[{mode}] {' '.join(argv[1:])}", flush=True)
    with open(folder / "log.txt", "w") as log:
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc.returncode, [
        "python",
        *[str(Path(a).relative_to(ROOT)) if a.startswith(str(ROOT)) else a for a in argv[1:]],
    ]


def bn_statistics(run: Path) -> dict[str, torch.Tensor]:
    """Every batch-norm layer's running mean and variance at the run's last checkpoint, by name."""
    (last,) = checkpoint.complete(run / "checkpoints")[-1:]
    return {k: v for k, v in checkpoint.weights(last).items() if k.endswith((".running_mean", ".running_var"))}


def bn_distance(stats: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """How far a run's BN statistics ended from fp32's, per kind (running_mean, running_var):
    `distance`, |run - fp32| / |fp32| over all layers' channels (16-bit rounding changes the trajectory, so the
    channels drift apart as any two runs do), and `scale`, the largest relative difference of one layer's
    statistics' size (|mean| for means, mean for variances): a bias such as lost small updates shows there."""
    out = {}
    for kind in ("running_mean", "running_var"):
        names = sorted(k for k in ref if k.endswith(kind))
        a, b = torch.cat([stats[k].flatten() for k in names]), torch.cat([ref[k].flatten() for k in names])
        out[f"{kind}_distance"] = float((a - b).norm() / b.norm())
        size = (lambda v: v.norm() / v.numel() ** 0.5) if kind == "running_mean" else (lambda v: v.mean())
        out[f"{kind}_scale"] = max(float((size(stats[k]) - size(ref[k])).abs() / size(ref[k])) for k in names)
    return out


def loss_scale_moves(rows: list[dict]) -> dict:
    """Overflow skips and growths of the loss scale in a run's per-step rows."""
    growths = sum(after["loss_scale"] > before["loss_scale"] for before, after in zip(rows, rows[1:], strict=False))
    scales = [r["loss_scale"] for r in rows]
    skipped = rows[-1]["skipped_steps"]
    return {
        "skipped_steps": skipped,
        "growths": growths,
        "skipped_share": skipped / len(rows),
        "first_scale": scales[0],
        "min_scale": min(scales),
        "max_scale": max(scales),
        "last_scale": scales[-1],
    }


def measure(args: argparse.Namespace, mode: str, folder: Path, reference: tuple | None) -> tuple[dict, dict | None]:
    """One mode's run: what the checks need from it, and its BN statistics (None if it failed). `reference` is
    fp32's (run, BN statistics) to compare with."""
    status, command = train(args, mode, folder)
    if status:
        tail = (folder / "log.txt").read_text()[-2000:]
        return {"mode": mode, "failed": f"exit {status}", "log_tail": tail, "command": " ".join(command)}, None
    run = folder / "run"
    rows = [json.loads(line) for line in (run / STEPS).read_text().splitlines()]
    stats = bn_statistics(run)
    found = {
        "mode": mode,
        "top1": final_top1(run),
        "steps": len(rows),
        "final_loss": rows[-1]["loss"],
        "bn_finite": all(bool(torch.isfinite(v).all()) for v in stats.values()),
        "bn_layers": sum(k.endswith(".running_var") for k in stats),
        "loss_scale": loss_scale_moves(rows) if mode in LOSS_SCALED else None,
        "command": " ".join(command),
    }
    if reference is not None:
        fp32, fp32_stats = reference
        found["top1_vs_fp32"] = found["top1"] - fp32["top1"]
        found["bn_distance"] = bn_distance(stats, fp32_stats)
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    return found, stats


def verdicts(runs: list[dict], args: argparse.Namespace) -> list[str]:
    """The checks, one line each, on the runs measured so far."""
    lines = []
    for r in runs:
        if "failed" in r:
            lines.append(f"{r['mode']}: the run failed ({r['failed']}); see its log.txt")
            continue
        lines.append(f"{r['mode']}: BN statistics finite: {'yes' if r['bn_finite'] else 'NO'}")
        if "top1_vs_fp32" in r:
            ok = r["top1_vs_fp32"] >= -args.top1_tolerance
            lines.append(
                f"{r['mode']}: top-1 {r['top1']:.2f} vs fp32 {r['top1'] - r['top1_vs_fp32']:.2f} "
                f"({r['top1_vs_fp32']:+.2f} points; within {args.top1_tolerance}: {_yes(ok)})"
            )
            d = r["bn_distance"]
            far = max(d["running_mean_scale"], d["running_var_scale"])
            lines.append(
                f"{r['mode']}: BN statistics' size per layer within {far:.3f} of fp32's "
                f"(at most {args.bn_tolerance}: {_yes(far <= args.bn_tolerance)})"
            )
        if r["loss_scale"] is not None:
            s = r["loss_scale"]
            ok = s["skipped_steps"] >= 1 and s["growths"] >= 1
            lines.append(
                f"{r['mode']}: loss scale {s['skipped_steps']} overflow skips, {s['growths']} growths "
                f"(at least one of each: {_yes(ok)})"
            )
    return lines


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def markdown(result: dict) -> str:
    """The comparison as a table and the verdicts."""
    lines = [
        f"# 16-bit numerics against fp32, {result['date']}",
        "",
        f"{result['device']}; {result['arch']} at {result['crop_size']} px, {result['epochs']} epochs, "
        f"B={result['batch']} (micro-batch {result['micro_batch']}), seed {result['seed']}, "
        f"loss-scale window {result['loss_scale_window']}. Command: `{result['command']}`",
        "",
        "| mode | top-1 | vs fp32 | final loss | BN size diff. (mean, var) | BN distance (mean, var) | skips "
        "| growths | loss scale range |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["runs"]:
        if "failed" in r:
            lines.append(f"| {r['mode']} | failed ({r['failed']}) |  |  |  |  |  |  |  |")
            continue
        d, s = r.get("bn_distance"), r["loss_scale"]
        cells = [
            r["mode"],
            f"{r['top1']:.2f}",
            f"{r['top1_vs_fp32']:+.2f}" if "top1_vs_fp32" in r else "",
            f"{r['final_loss']:.3f}",
            f"{d['running_mean_scale']:.3f}, {d['running_var_scale']:.3f}" if d else "",
            f"{d['running_mean_distance']:.3f}, {d['running_var_distance']:.3f}" if d else "",
            str(s["skipped_steps"]) if s else "",
            str(s["growths"]) if s else "",
            f"{s['min_scale']:g}..{s['max_scale']:g}" if s else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", *[f"- {v}" for v in result["verdicts"]], ""])


def main(argv: list[str] | None = None) -> int:
    """Train once per mode, writing the comparison after every run."""
    args = parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    info = machine()
    result = {
        "device": device_name(info),
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "bench/numerics.py", *(sys.argv[1:] if argv is None else argv)]),
        **{
            k: getattr(args, k)
            for k in (
                "arch",
                "epochs",
                "crop_size",
                "batch",
                "micro_batch",
                "seed",
                "loss_scale_window",
                "top1_tolerance",
                "bn_tolerance",
            )
        },
        "machine": info,
        "runs": [],
    }
    stem = Path(args.results) / f"{result['date']}-{device_slug(info)}-numerics"
    stem.parent.mkdir(parents=True, exist_ok=True)
    reference = None  # fp32's run and BN statistics, once it has run
    for mode in args.modes:
        if mode == "fp32":
            found, stats = measure(args, mode, work / mode, None)
            reference = None if stats is None else (found, stats)
        elif reference is None:
            found = {"mode": mode, "failed": "no fp32 reference"}
        else:
            found, _ = measure(args, mode, work / mode, reference)
        result["runs"].append(found)
        result["verdicts"] = verdicts(result["runs"], args)
        Path(f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        Path(f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"written: {stem}.json, {stem}.md")
    return 0 if all("NO" not in v and "failed" not in v for v in result["verdicts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
