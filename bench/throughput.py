"""Training throughput on one GPU (or this CPU), in four measurements per micro-batch, plus the speed levers.

    python bench/throughput.py [--micro-batches 32,128,256] [--arch resnet50] [--crop-size 224]
        [--deepspeed-config ds_configs/bs256.json] [--images 25600] [--window 10] [--windows 6]
        [--levers auto|none|all|NAME,...] [--lever-micro-batch N] [--repeats 1] [--profile] [--results DIR]
        [--tag NAME]

--profile also runs, per micro-batch, a profiled synthetic run (top operators, written beside the results)
and the phases of an optimizer step (forward, backward, optimizer) for DeepSpeed and for plain AMP.

For every micro-batch (per GPU; the optimizer step keeps the configuration's batch by accumulation):
  dali_pipeline  pipeline.data's training batches alone, decoded from real JPEG shards (nothing consumes them);
  synthetic      pipeline/train.py's training loop and DeepSpeed engine on one batch already on the device
                 (the compute ceiling of our code);
  end_to_end     pipeline/train.py itself with --max-steps: DALI shards into the DeepSpeed engine;
  baseline_amp   the same model and optimizer in plain PyTorch: autocast + GradScaler, channels-last,
                 synthetic input on the device.
Each runs in its own process (a fresh CUDA context and allocator) on the generated ImageNet-like photos
(500x375, ~110 KB; beyond 2,100 the photos repeat under new names). Time is read in windows of --window
optimizer steps with one host-device sync at each window's end, as train.py logs (its --log-every); the
windows that open an epoch (the epoch's DALI pipeline is built then: once per 5,000 steps on ImageNet at
B=256) and the first --warmup-steps are left out, and the median of the rest is reported (pooled over
--repeats runs, which take turns).

On a GPU the defaults are the issue's setting (ResNet-50 at 224, fp16, ds_configs/bs256.json, micro-batches
32/128/256, every lever); on a CPU a small one that ends in minutes. Writes bench/results/<date>-<device>.json
and .md (the README's table) at the end, and each measurement as it ends to <date>-<device>-progress.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench.children import child_main  # noqa: E402
from bench.common import BENCH, bench_tree, machine  # noqa: E402
from bench.data_bench import bench_shards  # noqa: E402
from bench.report import HOPPER_MATRIX_FLOP_S, device_name, device_slug, markdown, train_flop, verdicts  # noqa: E402
from bench.windows import steady_rates, steps_needed  # noqa: E402
from pipeline import deepspeed_json, ending  # noqa: E402
from pipeline.launch import without_launcher  # noqa: E402
from pipeline.model import uses_channels_last  # noqa: E402

MODES = ("dali_pipeline", "synthetic", "end_to_end", "baseline_amp")

# Settings the harness handles itself; the others are pipeline/train.py flags.
NOT_FLAGS = ("fused", "profile", "engine")
# Each lever: the measurement it shows in, and its settings (train.py flags; "fused" edits the DeepSpeed
# configuration), the first being the tuned default the others are compared with.
LEVERS = {
    "memory_format": (
        "end_to_end",
        {"channels_last": {"memory_format": "channels_last"}, "contiguous (NCHW)": {"memory_format": "contiguous"}},
    ),
    "fused_sgd": ("synthetic", {"fused": {"fused": True}, "unfused (foreach)": {"fused": False}}),
    "log_every": ("synthetic", {"20": {"log_every": 20}, "1 (a sync every step)": {"log_every": 1}}),
    "data_prefetch": ("end_to_end", {"2": {"data_prefetch": 2}, "1": {"data_prefetch": 1}, "4": {"data_prefetch": 4}}),
    "data_threads": ("end_to_end", {"default": {}, "4": {"data_threads": 4}, "2": {"data_threads": 2}}),
    "hw_decoder_load": (
        "end_to_end",
        {"per GPU model": {}, "0 (nvJPEG CUDA only)": {"hw_decoder_load": 0.0}, "0.9": {"hw_decoder_load": 0.9}},
    ),
    # The time-to-accuracy levers' cost (docs/recipes.md): the training crop of progressive resizing, BlurPool, and
    # the average of the weights (updated every step, and every 4th).
    "crop_size": (
        "synthetic",
        {
            "224": {"crop_size": 224, "val_resize": 256},
            "192": {"crop_size": 192, "val_resize": 219},
            "160": {"crop_size": 160, "val_resize": 183},
        },
    ),
    "blurpool": ("synthetic", {"off": {}, "on": {"blurpool": True}}),
    "ema": (
        "synthetic",
        {"off": {}, "every step": {"ema_decay": 0.9999}, "every 4 steps": {"ema_decay": 0.9999, "ema_every": 4}},
    ),
    "compile": (
        "synthetic",
        {
            "none": {"compile": "none"},
            "default": {"compile": "default"},
            "reduce-overhead (CUDA graphs)": {"compile": "reduce-overhead"},
        },
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line, with defaults for the device at hand."""
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--micro-batches",
        default="32,128,256" if gpu else "16,32",
        help="per-GPU micro-batches, or none (the levers alone, at --lever-micro-batch)",
    )
    p.add_argument("--arch", default="resnet50" if gpu else "resnet18")
    p.add_argument("--crop-size", type=int, default=224 if gpu else 112)
    p.add_argument("--deepspeed-config", default=str(ROOT / "ds_configs" / ("bs256.json" if gpu else "cpu.json")))
    p.add_argument("--images", type=int, default=25600 if gpu else 2100, help="photos in the generated tree")
    p.add_argument("--data-dir", help="shards to read instead of the generated photos'")
    p.add_argument("--window", type=int, default=10 if gpu else 3, help="optimizer steps per timed window")
    p.add_argument("--windows", type=int, default=6 if gpu else 3, help="timed windows per measurement")
    p.add_argument("--warmup-steps", type=int, help="optimizer steps left out at the start (default: 2 windows)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each measurement, taking turns; windows pooled")
    p.add_argument("--data-threads", type=int, default=0, help="DALI threads (0: every core)")
    p.add_argument(
        "--levers", default="auto", help="auto (all on a GPU, none on a CPU), none, all, or names: " + ",".join(LEVERS)
    )
    p.add_argument("--lever-micro-batch", type=int, help="micro-batch of the lever runs (default: the largest)")
    p.add_argument("--profile", action="store_true", help="also profile each micro-batch (see above)")
    p.add_argument("--results", default=str(BENCH / "results"), help="folder for the results")
    p.add_argument("--tag", default="", help="added to the results' file names (<date>-<device>-<tag>.json)")
    p.add_argument("--work", default=str(BENCH / "work" / "throughput"), help="folder for the runs (emptied first)")
    args = p.parse_args(argv)
    args.micro_batches = [] if args.micro_batches == "none" else [int(m) for m in args.micro_batches.split(",")]
    if not args.micro_batches and not args.lever_micro_batch:
        raise SystemExit("error: --micro-batches none measures the levers alone: give --lever-micro-batch")
    args.warmup_steps = 2 * args.window if args.warmup_steps is None else args.warmup_steps
    args.levers = _levers(args.levers, gpu)
    args.lever_micro_batch = args.lever_micro_batch or max(args.micro_batches)
    return args


def _levers(spec: str, gpu: bool) -> list[str]:
    """The lever names a --levers value stands for."""
    if spec == "auto":
        return list(LEVERS) if gpu else []
    names = [] if spec == "none" else list(LEVERS) if spec == "all" else spec.split(",")
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        raise SystemExit(f"error: --levers {unknown[0]}: use auto, none, all or some of {', '.join(LEVERS)}")
    return names


# ---- the parent: plan, run the children, report ----


class Bench:
    """The measurements of one harness run: shards, configurations, and the children that measure."""

    def __init__(self, args: argparse.Namespace):
        from pipeline.data.shards import open_shards

        self.args, self.gpu = args, torch.cuda.is_available()
        self.work = Path(args.work)
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.shards = Path(args.data_dir) if args.data_dir else bench_shards(bench_tree(args.images))
        shards = open_shards(str(self.shards))
        self.train_images, self.num_classes = shards.splits["train"].images, shards.num_classes
        self.base = json.loads(Path(args.deepspeed_config).read_text())
        fitted, self.notes = deepspeed_json.configure(self.base, args.deepspeed_config, 1, self.gpu)
        self.precision = deepspeed_json.precision(fitted)
        self.runs = 0
        self.info, self.date = machine(), datetime.date.today().isoformat()
        self.stem = Path(args.results) / "-".join(filter(None, [self.date, device_slug(self.info), args.tag]))
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        # Every measurement is appended here as soon as it ends: a run cut short (a lent GPU's time limit)
        # still leaves its figures. The .json and .md are written when every measurement is done.
        self.progress = Path(f"{self.stem}-progress.jsonl")
        self.progress.unlink(missing_ok=True)

    def ds_file(self, micro: int, fused: bool | None = None) -> tuple[Path, dict]:
        """The configuration at `micro` images per forward pass, keeping its batch (by accumulation) where it can."""
        ds = json.loads(json.dumps(self.base))
        ds["train_micro_batch_size_per_gpu"] = micro
        ds["train_batch_size"] = max(ds["train_batch_size"] // micro, 1) * micro
        if fused is not None:
            ds["optimizer"]["params"]["fused"] = fused
        path = self.work / f"ds-mb{micro}{'' if fused is None else '-fused' if fused else '-unfused'}.json"
        path.write_text(json.dumps(ds, indent=1))
        return path, ds

    def train_argv(self, ds_path: Path, out: Path, steps: int, window: int, settings: dict) -> list[str]:
        """pipeline/train.py's flags for a timed run: no warmup (lr is irrelevant here), a long schedule, no
        validation or checkpoint until --max-steps, wandb off, and the setting's own flags."""
        a = self.args
        argv = [
            "--deepspeed_config",
            str(ds_path),
            "--data-dir",
            str(self.shards),
            "--arch",
            a.arch,
            "--crop-size",
            str(a.crop_size),
            "--val-resize",
            str(a.crop_size),
            "--epochs",
            "1000",
            "--warmup-epochs",
            "0",
            "--max-steps",
            str(steps),
            "--log-every",
            str(window),
            "--eval-every",
            "1000",
            "--save-every-epochs",
            "1000",
            "--keep-checkpoints",
            "1",
            "--data-threads",
            str(a.data_threads),
            "--out-dir",
            str(out),
            "--wandb-mode",
            "disabled",
        ]
        for name, value in settings.items():
            if name not in NOT_FLAGS:
                argv += ["--" + name.replace("_", "-"), str(value)]
        return argv

    def measure(self, mode: str, micro: int, settings: dict | None = None) -> dict:
        """One measurement in a child process: its steady window rates and median images/s."""
        settings, a = settings or {}, self.args
        window = settings.get("log_every", a.window)
        ds_path, ds = self.ds_file(micro, settings.get("fused"))
        accum = ds["train_batch_size"] // micro
        per_epoch = math.ceil(self.train_images / ds["train_batch_size"])
        steps = steps_needed(a.windows, a.warmup_steps, window, per_epoch)
        self.runs += 1
        # A new folder per run: the work folder was emptied when the harness started.
        folder = self.work / f"run{self.runs}-{mode}-mb{micro}"
        folder.mkdir(parents=True)
        argv = self.train_argv(ds_path, folder / "out", steps, window, settings)
        if mode == "end_to_end":
            command = [sys.executable, str(ROOT / "pipeline" / "train.py"), *argv]
        else:
            spec = dict(
                mode=mode,
                argv=argv,
                result=str(folder / "result.json"),
                data_dir=str(self.shards),
                micro=micro,
                accum=accum,
                crop=a.crop_size,
                precision=self.precision,
                steps=steps,
                steps_per_epoch=per_epoch,
                window=window,
                arch=a.arch,
                num_classes=self.num_classes,
                channels_last=uses_channels_last(settings.get("memory_format", "auto"), self.gpu),
                data_threads=a.data_threads,
                sgd=ds["optimizer"]["params"],
                warmup=a.warmup_steps,
                engine=settings.get("engine"),
            )
            if settings.get("profile"):
                spec.update(profile=str(folder / "profile.txt"), warmup_micro=a.warmup_steps * accum)
            (folder / "spec.json").write_text(json.dumps(spec))
            command = [sys.executable, str(Path(__file__).resolve()), "--child", str(folder / "spec.json")]
        label = " ".join(f"{k}={v}" for k, v in settings.items())
        print(f"[{mode} micro-batch {micro}{' ' + label if label else ''}] {steps} steps ...", flush=True)
        with open(folder / "log.txt", "w") as log:
            proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=without_launcher(os.environ))
        if proc.returncode:
            tail = (folder / "log.txt").read_text()[-3000:]
            raise SystemExit(f"error: {mode} at micro-batch {micro} failed (exit {proc.returncode}):\n{tail}")
        if mode == "phases":
            phases = json.loads((folder / "result.json").read_text())["phases_ms"]
            print("    " + ", ".join(f"{k} {v:.1f} ms" for k, v in phases.items()), flush=True)
            self.log(mode, micro, settings, {"phases_ms": phases, "steps": steps})
            return {"phases_ms": phases, "steps": steps}
        if mode in ("end_to_end", "synthetic"):
            lines = (folder / "out" / "steps.jsonl").read_text().splitlines()
            rows = [json.loads(line) for line in lines]
        else:
            rows = json.loads((folder / "result.json").read_text())["rows"]
        # The checkpoint train.py saves at --max-steps is not needed (a ResNet-50's is ~300 MB).
        shutil.rmtree(folder / "out" / "checkpoints", ignore_errors=True)
        rates = steady_rates(rows, per_epoch, window, a.warmup_steps)
        result = {"img_s": statistics.median(rates), "windows": rates, "steps": steps}
        if mode == "end_to_end":
            result["command"] = " ".join(["python", "pipeline/train.py", *argv])
        if (folder / "profile.txt").exists():
            result["profile"] = (folder / "profile.txt").read_text()
        print(f"    {result['img_s']:.0f} img/s (windows: {', '.join(f'{r:.0f}' for r in rates)})", flush=True)
        self.log(mode, micro, settings, {k: v for k, v in result.items() if k != "profile"})
        return result

    def log(self, mode: str, micro: int, settings: dict, result: dict) -> None:
        """Append one measurement to the progress file."""
        line = {
            "mode": mode,
            "micro_batch": micro,
            "settings": settings,
            "precision": self.precision,
            "arch": self.args.arch,
            "device": self.info["gpu"] or "cpu",
            **result,
        }
        with open(self.progress, "a") as f:
            f.write(json.dumps(line) + "\n")

    def repeated(self, runs: list[tuple[str, dict]], micro: int) -> list[dict]:
        """Each (mode, settings) measured --repeats times, taking turns (a drift of the machine hits all alike);
        each one's windows pooled over its repeats, with the median of the pool."""
        found: list[list[dict]] = [[] for _ in runs]
        for _ in range(self.args.repeats):
            for results, (mode, settings) in zip(found, runs, strict=True):
                results.append(self.measure(mode, micro, settings))
        pooled = []
        for results in found:
            windows = [rate for r in results for rate in r["windows"]]
            pooled.append(
                {
                    **results[0],
                    "img_s": statistics.median(windows),
                    "windows": windows,
                    "per_run": [r["img_s"] for r in results],
                }
            )
        return pooled

    def row(self, micro: int) -> dict:
        """The four measurements at one micro-batch, and their ratios."""
        found = dict(zip(MODES, self.repeated([(mode, {}) for mode in MODES], micro), strict=True))
        row = {"micro_batch": micro, **{f"{m}_img_s": found[m]["img_s"] for m in MODES}}
        row["end_to_end_vs_synthetic"] = row["end_to_end_img_s"] / row["synthetic_img_s"]
        row["deepspeed_vs_amp"] = row["synthetic_img_s"] / row["baseline_amp_img_s"]
        row["details"] = found
        # The configuration as measured, to commit under ds_configs/ for the setting that wins.
        row["deepspeed_config"] = self.ds_file(micro)[1]
        if self.args.profile:
            # Their own runs: the profiler slows the steps it records, the phase syncs stop overlap.
            row["profile"] = self.measure("synthetic", micro, {"profile": True})["profile"]
            row["phases_ms"] = {
                e: self.measure("phases", micro, {"engine": e})["phases_ms"] for e in ("deepspeed", "amp")
            }
        return row

    def levers(self) -> list[dict]:
        """Each lever's settings measured at --lever-micro-batch, each against the first (tuned) setting."""
        out = []
        for name in self.args.levers:
            mode, settings = LEVERS[name]
            found = self.repeated([(mode, s) for s in settings.values()], self.args.lever_micro_batch)
            for label, result in zip(settings, found, strict=True):
                out.append(
                    dict(
                        lever=name,
                        mode=mode,
                        setting=label,
                        img_s=result["img_s"],
                        vs_default=result["img_s"] / found[0]["img_s"],
                        per_run=result["per_run"],
                        windows=result["windows"],
                    )
                )
        return out


def main(argv: list[str] | None = None) -> int:
    """Measure every micro-batch and lever, then write the results."""
    args = parse_args(argv)
    bench = Bench(args)
    rows = [bench.row(micro) for micro in args.micro_batches]
    levers = bench.levers()
    import deepspeed
    import nvidia.dali

    info = bench.info
    best = max(rows, key=lambda r: r["end_to_end_img_s"]) if rows else None
    result = {
        "device": device_name(info),
        "gpu": bool(info["gpu"]),
        "date": bench.date,
        "command": " ".join(["python", "bench/throughput.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": args.arch,
        "crop_size": args.crop_size,
        "precision": bench.precision,
        "deepspeed_config": args.deepspeed_config,
        "train_batch_size": bench.base["train_batch_size"],
        "train_images": bench.train_images,
        "window": args.window,
        "windows": args.windows,
        "warmup_steps": args.warmup_steps,
        "repeats": args.repeats,
        "train_flop": train_flop(args.arch, args.crop_size),
        "micro_batch": best and best["micro_batch"],
        **{f"{m}_img_s": best and best[f"{m}_img_s"] for m in MODES},
        "best": best and {k: v for k, v in best.items() if k != "details"},
        "rows": rows,
        "lever_micro_batch": args.lever_micro_batch,
        "levers": levers,
        "notes": bench.notes,
        "machine": info,
        "versions": {"deepspeed": deepspeed.__version__, "dali": nvidia.dali.__version__},
    }
    if result["gpu"] and best:
        result["share_of_matrix_rate"] = best["synthetic_img_s"] * result["train_flop"] / HOPPER_MATRIX_FLOP_S
    result["verdicts"] = verdicts(result)
    stem = bench.stem
    for row in rows:
        if "profile" in row:
            profile = Path(f"{stem}-profile-mb{row['micro_batch']}.txt")
            profile.write_text(row.pop("profile"))
            row["profile_file"] = profile.name
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    Path(f"{stem}.md").write_text(text)
    print(text)
    print(f"written: {stem}.json, {stem}.md (and each measurement as it ended: {bench.progress.name})")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        ending.end_process(child_main(sys.argv[2]))
    ending.end_process(main())
