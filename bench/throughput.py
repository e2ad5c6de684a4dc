"""Training throughput on one GPU (or this CPU), in four measurements per micro-batch, plus the speed levers.

    python bench/throughput.py [--micro-batches 32,128,256] [--arch resnet50] [--crop-size 224]
        [--deepspeed-config ds_configs/bs256.json] [--images 25600] [--window 10] [--windows 6]
        [--levers auto|none|all|NAME,...] [--lever-micro-batch N] [--repeats 1] [--profile] [--results DIR]

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
and .md (the README's table).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench.common import BENCH, bench_tree, machine  # noqa: E402
from bench.data_bench import bench_shards  # noqa: E402
from pipeline import engine, schedule  # noqa: E402
from pipeline.distributed import without_launcher  # noqa: E402
from pipeline.model import uses_channels_last  # noqa: E402

MODES = ("dali_pipeline", "synthetic", "end_to_end", "baseline_amp")
# The targets on one H100/H200, ResNet-50 fp16.
TARGET_IMG_S, TARGET_DATA_SHARE, TARGET_VS_AMP = 3000, 0.95, 0.95
# The bf16/fp16 matrix rate measured on an H100 (shared/method.md): the arithmetic ceiling.
HOPPER_MATRIX_FLOP_S = 790e12

# Settings the harness handles itself; the others are pipeline/train.py flags.
NOT_FLAGS = ("fused", "profile", "engine")
# Each lever: the measurement it shows in, and its settings (train.py flags; "fused" edits the DeepSpeed
# configuration), the first being the tuned default the others are compared with.
LEVERS = {
    "memory_format": ("end_to_end", {"channels_last": {"memory_format": "channels_last"},
                                     "contiguous (NCHW)": {"memory_format": "contiguous"}}),
    "fused_sgd": ("synthetic", {"fused": {"fused": True}, "unfused (foreach)": {"fused": False}}),
    "log_every": ("synthetic", {"20": {"log_every": 20}, "1 (a sync every step)": {"log_every": 1}}),
    "data_prefetch": ("end_to_end", {"2": {"data_prefetch": 2}, "1": {"data_prefetch": 1},
                                     "4": {"data_prefetch": 4}}),
    "data_threads": ("end_to_end", {"default": {}, "4": {"data_threads": 4}, "2": {"data_threads": 2}}),
    "hw_decoder_load": ("end_to_end", {"per GPU model": {}, "0 (nvJPEG CUDA only)": {"hw_decoder_load": 0.0},
                                       "0.9": {"hw_decoder_load": 0.9}}),
    "compile": ("synthetic", {"none": {"compile": "none"}, "default": {"compile": "default"},
                              "reduce-overhead (CUDA graphs)": {"compile": "reduce-overhead"}}),
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line, with defaults for the device at hand."""
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--micro-batches", default="32,128,256" if gpu else "16,32", help="per-GPU micro-batches")
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
    p.add_argument("--levers", default="auto", help="auto (all on a GPU, none on a CPU), none, all, or names: "
                   + ",".join(LEVERS))  # fmt: skip
    p.add_argument("--lever-micro-batch", type=int, help="micro-batch of the lever runs (default: the largest)")
    p.add_argument("--profile", action="store_true", help="also profile each micro-batch (see above)")
    p.add_argument("--results", default=str(BENCH / "results"), help="folder for the results")
    p.add_argument("--work", default=str(BENCH / "work" / "throughput"), help="folder for the runs (emptied first)")
    args = p.parse_args(argv)
    args.micro_batches = [int(m) for m in args.micro_batches.split(",")]
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


# ---- windows: how a measurement's steps become images/s ----


class Windows:
    """Images/s per optimizer step, closed the way train.py flushes: every `window` steps and at epoch ends."""

    def __init__(self, window: int, images_per_step: int, steps_per_epoch: int, gpu: bool):
        self.window, self.images_per_step, self.steps_per_epoch = window, images_per_step, steps_per_epoch
        self.gpu = gpu
        self.rows: list[dict] = []
        self.pending: list[int] = []
        self.start = time.perf_counter()

    def step(self, step: int) -> None:
        """Count optimizer step `step`; at a window's end, wait for the device and time the window."""
        self.pending.append(step)
        if step % self.window and step % self.steps_per_epoch:
            return
        if self.gpu:
            torch.cuda.synchronize()  # a host-device sync point, on purpose: once per window, as train.py's log
        now = time.perf_counter()
        rate = len(self.pending) * self.images_per_step / (now - self.start)
        self.rows += [{"step": s, "images_per_sec": rate} for s in self.pending]
        self.pending, self.start = [], now


def steady_rates(rows: list[dict], steps_per_epoch: int, window: int, warmup: int) -> list[float]:
    """Images/s of the full windows in `rows` (per-step lines like steps.jsonl), leaving out those that open
    an epoch (they build its data pipeline) and those within the first `warmup` steps (compilation, cuDNN
    autotuning)."""
    windows: dict[tuple[int, int], list[int]] = defaultdict(list)
    rate = {}
    for row in rows:
        s = row["step"]
        # Two steps share a window when no epoch end and no multiple of `window` lies between them.
        key = ((s - 1) // steps_per_epoch, (s - 1) // window)
        windows[key].append(s)
        rate[key] = row["images_per_sec"]
    kept = []
    for key, steps in sorted(windows.items()):
        opens_epoch = min(steps) == key[0] * steps_per_epoch + 1
        if min(steps) > warmup and len(steps) == window and not opens_epoch:
            kept.append(rate[key])
    return kept


def steps_needed(windows: int, warmup: int, window: int, steps_per_epoch: int) -> int:
    """Optimizer steps to run (a multiple of `window`) for `windows` steady windows under steady_rates' rules."""
    if window > steps_per_epoch:
        raise SystemExit(
            f"error: --window {window} is longer than an epoch ({steps_per_epoch} steps): use a shorter window "
            "or more --images"
        )
    steps = 0
    while len(steady_rates(_rows(steps), steps_per_epoch, window, warmup)) < windows:
        steps += window
    return steps


def _rows(steps: int) -> list[dict]:
    """Placeholder per-step rows for 1..steps (for counting windows)."""
    return [{"step": s, "images_per_sec": 0.0} for s in range(1, steps + 1)]


# ---- the measurements, each in a child process ----


def dali_child(spec: dict) -> dict:
    """The training input pipeline alone: `steps` optimizer steps' worth of micro-batches, timed in windows."""
    from pipeline.data import DataConfig, ImageNetData

    config = DataConfig(
        spec["data_dir"], batch_size=spec["micro"], crop_size=spec["crop"], val_resize=spec["crop"],
        dtype=engine.DATA_DTYPES[spec["precision"]], layout="NHWC" if spec["channels_last"] else "NCHW",
        num_threads=spec["data_threads"],
    )  # fmt: skip
    data = ImageNetData(config, grad_accum=spec["accum"], splits=("train",))
    per_epoch = data.train_steps // spec["accum"]
    clock = Windows(spec["window"], spec["micro"] * spec["accum"], per_epoch, data.gpu)
    step, micro = 0, 0
    for epoch in range(math.ceil(spec["steps"] / per_epoch)):
        for _batch in data.train_epoch(epoch):
            micro += 1
            if micro % spec["accum"] == 0:
                step += 1
                clock.step(step)
                if step == spec["steps"]:
                    break
    return {"rows": clock.rows, "steps_per_epoch": per_epoch}


class AmpSteps:
    """Plain PyTorch AMP: the same model (channels-last) and Nesterov SGD, autocast and GradScaler, synthetic input
    on the device, the same accumulation; no DeepSpeed, no learning-rate schedule."""

    def __init__(self, spec: dict):
        from pipeline.model import build_model, param_groups

        self.gpu = torch.cuda.is_available()
        device = torch.device("cuda" if self.gpu else "cpu")
        if self.gpu:
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(0)
        model, _ = build_model(spec["arch"], spec["num_classes"], channels_last=True)
        self.model, self.accum = model.to(device).train(), spec["accum"]
        sgd = spec["sgd"]
        self.optimizer = torch.optim.SGD(param_groups(model, sgd.get("weight_decay", 0.0)), lr=sgd["lr"],
                                         momentum=sgd.get("momentum", 0.9), nesterov=True, fused=self.gpu)  # fmt: skip
        # The compute dtype of the DeepSpeed run it is compared with (fp16/bf16 in either DeepSpeed mode).
        self.half = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(engine.DATA_DTYPES[spec["precision"]])
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.half == torch.float16)
        self.images, self.labels = _synthetic_batch(spec["micro"], spec["crop"], spec["num_classes"],
                                                    self.half or torch.float32, True, device)  # fmt: skip

    def forward(self) -> torch.Tensor:
        """The loss of one micro-batch."""
        import torch.nn.functional as F

        with torch.autocast(self.images.device.type, dtype=self.half, enabled=self.half is not None):
            logits = self.model(self.images)
        return F.cross_entropy(logits.float(), self.labels)

    def backward(self, loss: torch.Tensor) -> None:
        """Scaled gradients, accumulated."""
        self.scaler.scale(loss / self.accum).backward()

    def step(self, boundary: bool) -> None:
        """At the accumulation boundary: unscale, skip on overflow or step, update the scale, clear the grads."""
        if boundary:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)


class DeepSpeedSteps:
    """The calls pipeline/train.py's loop makes per micro-batch, on its own engine, with synthetic input."""

    def __init__(self, spec: dict):
        from pipeline import train

        self.run, self.gpu = train.start(spec["argv"]), torch.cuda.is_available()
        if isinstance(self.run, int):
            raise SystemExit(self.run)
        self.loss_fn = train.loss_fn
        dtype = getattr(torch, engine.DATA_DTYPES[self.run.precision])
        self.images, self.labels = _synthetic_batch(self.run.micro, self.run.opts.crop_size, self.run.data.num_classes,
                                                    dtype, self.run.channels_last, self.run.engine.device)  # fmt: skip

    def forward(self) -> torch.Tensor:
        """The loss of one micro-batch."""
        return self.loss_fn(self.run, self.run.engine(self.images), self.labels)

    def backward(self, loss: torch.Tensor) -> None:
        """DeepSpeed's backward: scaled, accumulated."""
        self.run.engine.backward(loss)

    def step(self, boundary: bool) -> None:
        """DeepSpeed's step on every micro-batch (it steps the optimizer at the boundary), then the schedule."""
        self.run.engine.step()
        if boundary:
            schedule.follow(self.run.engine)


def baseline_child(spec: dict) -> dict:
    """Plain PyTorch AMP (AmpSteps), timed in windows like the others."""
    amp = AmpSteps(spec)
    clock = Windows(spec["window"], spec["micro"] * spec["accum"], spec["steps_per_epoch"], amp.gpu)
    for step in range(1, spec["steps"] + 1):
        for micro in range(spec["accum"]):
            amp.backward(amp.forward())
            amp.step(micro == spec["accum"] - 1)
        clock.step(step)
    return {"rows": clock.rows, "steps_per_epoch": spec["steps_per_epoch"]}


PHASES = ("forward", "backward", "optimizer")


def phases_child(spec: dict) -> dict:
    """Milliseconds per optimizer step in forward, backward and the optimizer step, for DeepSpeed or plain AMP.
    Each phase ends with a device sync, which stops host and device overlapping: the parts add up to more than
    a free-running step, but show where the time goes."""
    steps = AmpSteps(spec) if spec["engine"] == "amp" else DeepSpeedSteps(spec)
    totals, start = dict.fromkeys(PHASES, 0.0), 0.0

    def mark(phase: str | None) -> None:
        nonlocal start
        if steps.gpu:
            torch.cuda.synchronize()  # a host-device sync point, on purpose: the phase's work is done
        now = time.perf_counter()
        if phase is not None:
            totals[phase] += now - start
        start = now

    for step in range(1, spec["steps"] + 1):
        if step == spec["warmup"] + 1:
            totals = dict.fromkeys(PHASES, 0.0)
        for micro in range(spec["accum"]):
            mark(None)
            loss = steps.forward()
            mark("forward")
            steps.backward(loss)
            mark("backward")
            steps.step(micro == spec["accum"] - 1)
            mark("optimizer")
    timed = spec["steps"] - spec["warmup"]
    return {"phases_ms": {phase: 1000 * seconds / timed for phase, seconds in totals.items()}}


def _synthetic_batch(micro: int, crop: int, classes: int, dtype, channels_last: bool, device) -> tuple:
    """One normalised-looking image batch (N, C, H, W) and its labels, on `device`."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(micro, 3, crop, crop, generator=generator).to(device, dtype)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, classes, (micro,), generator=generator).to(device)


class SyntheticInput:
    """Stands in for a run's ImageNetData: the same step counts, one batch held on the device for every step.
    With a profiler, each training batch handed out advances its schedule."""

    def __init__(self, data, batch: tuple, profiler=None):
        self.real, self.batch, self.profiler = data, batch, profiler

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    def train_epoch(self, epoch: int):
        """`train_steps` copies of the batch."""
        for _ in range(self.real.train_steps):
            if self.profiler is not None:
                self.profiler.step()
            yield self.batch

    def validation(self):
        """`val_steps` copies of the batch."""
        for _ in range(self.real.val_steps):
            yield self.batch


def synthetic_child(spec: dict) -> dict:
    """pipeline/train.py's own run (engine, loop, logging) with SyntheticInput in place of the DALI reader."""
    from pipeline import train

    steps = DeepSpeedSteps(spec)
    run = steps.run
    profiler = _profiler(spec, run.accum) if spec.get("profile") else None
    run.data = SyntheticInput(run.data, (steps.images, steps.labels), profiler)
    if profiler is not None:
        profiler.start()
    status = train.train_to_end(run)
    if profiler is not None:
        profiler.stop()
    if status:
        raise SystemExit(status)
    return {}


def _profiler(spec: dict, accum: int):
    """A torch profiler over a few optimizer steps after warm-up; writes the top operators to spec['profile']."""
    from torch.profiler import ProfilerActivity, profile, schedule

    gpu = torch.cuda.is_available()

    def write(prof) -> None:
        key = "self_cuda_time_total" if gpu else "self_cpu_time_total"
        Path(spec["profile"]).write_text(prof.key_averages().table(sort_by=key, row_limit=25))

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    # Micro-batches: skip the warm-up steps, then record three optimizer steps.
    steps = schedule(wait=spec["warmup_micro"], warmup=accum, active=3 * accum, repeat=1)
    return profile(activities=activities, schedule=steps, on_trace_ready=write)


CHILDREN = {"dali_pipeline": dali_child, "baseline_amp": baseline_child, "synthetic": synthetic_child,
            "phases": phases_child}  # fmt: skip


def child_main(spec_file: str) -> int:
    """Run one measurement from its spec file and write what it returns next to it."""
    spec = json.loads(Path(spec_file).read_text())
    result = CHILDREN[spec["mode"]](spec)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


# ---- the parent: plan, run the children, report ----


class Bench:
    """The measurements of one harness run: shards, configurations, and the children that measure."""

    def __init__(self, args: argparse.Namespace):
        from pipeline.shards import open_shards

        self.args, self.gpu = args, torch.cuda.is_available()
        self.work = Path(args.work)
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.shards = Path(args.data_dir) if args.data_dir else bench_shards(bench_tree(args.images))
        shards = open_shards(str(self.shards))
        self.train_images, self.num_classes = shards.splits["train"].images, shards.num_classes
        self.base = json.loads(Path(args.deepspeed_config).read_text())
        fitted, self.notes = engine.fit(self.base, args.deepspeed_config, 1, self.gpu)
        self.precision = engine.precision(fitted)
        self.runs = 0

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
            "--deepspeed_config", str(ds_path), "--data-dir", str(self.shards), "--arch", a.arch,
            "--crop-size", str(a.crop_size), "--val-resize", str(a.crop_size), "--epochs", "1000",
            "--warmup-epochs", "0", "--max-steps", str(steps), "--log-every", str(window),
            "--eval-every", "1000", "--save-every-epochs", "1000", "--keep-checkpoints", "1",
            "--data-threads", str(a.data_threads), "--out-dir", str(out), "--wandb-mode", "disabled",
        ]  # fmt: skip
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
            spec = dict(mode=mode, argv=argv, result=str(folder / "result.json"), data_dir=str(self.shards),
                        micro=micro, accum=accum, crop=a.crop_size, precision=self.precision, steps=steps,
                        steps_per_epoch=per_epoch, window=window, arch=a.arch, num_classes=self.num_classes,
                        channels_last=uses_channels_last(settings.get("memory_format", "auto"), self.gpu),
                        data_threads=a.data_threads, sgd=ds["optimizer"]["params"], warmup=a.warmup_steps,
                        engine=settings.get("engine"))  # fmt: skip
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
        return result

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
            pooled.append({**results[0], "img_s": statistics.median(windows), "windows": windows,
                           "per_run": [r["img_s"] for r in results]})  # fmt: skip
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
            row["phases_ms"] = {e: self.measure("phases", micro, {"engine": e})["phases_ms"]
                                for e in ("deepspeed", "amp")}  # fmt: skip
        return row

    def levers(self) -> list[dict]:
        """Each lever's settings measured at --lever-micro-batch, each against the first (tuned) setting."""
        out = []
        for name in self.args.levers:
            mode, settings = LEVERS[name]
            found = self.repeated([(mode, s) for s in settings.values()], self.args.lever_micro_batch)
            for label, result in zip(settings, found, strict=True):
                out.append(dict(lever=name, mode=mode, setting=label, img_s=result["img_s"],
                                vs_default=result["img_s"] / found[0]["img_s"], per_run=result["per_run"],
                                windows=result["windows"]))  # fmt: skip
        return out


def train_flop(arch: str, crop: int) -> float:
    """Multiply-add FLOP of one training image (forward and backward, about 3x the forward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.model import build_model

    model, _ = build_model(arch, 1000)
    model.eval()  # one image: batch norm cannot train on it, and its FLOP are the same
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, crop, crop))
    return 3.0 * counter.get_total_flops()


def device_slug(info: dict) -> str:
    """The results' file name part for this machine: the GPU's name, or cpu-<host>."""
    name = info["gpu"] or f"cpu-{info['host']}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def verdicts(result: dict) -> list[str]:
    """The issue's three targets, judged on the best end-to-end row (on a GPU)."""
    best = result["best"]
    e2e, share, vs_amp = best["end_to_end_img_s"], best["end_to_end_vs_synthetic"], best["deepspeed_vs_amp"]
    if not result["gpu"]:
        return ["Targets are for one H100/H200 GPU: not judged on a CPU."]

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    return [
        f"end to end >= {TARGET_IMG_S:,} img/s: {e2e:,.0f} ({met(e2e >= TARGET_IMG_S)})",
        f"end to end >= {TARGET_DATA_SHARE} of synthetic: {share:.3f} ({met(share >= TARGET_DATA_SHARE)})",
        f"DeepSpeed >= {TARGET_VS_AMP} of plain AMP: {vs_amp:.3f} ({met(vs_amp >= TARGET_VS_AMP)})",
    ]


def markdown(result: dict) -> str:
    """The results as README-ready tables."""
    m = result["machine"]
    host = f"; host {m['cpu']} ({m['cores']} cores)" if result["gpu"] else ""
    lines = [
        f"# Training throughput, {result['date']}",
        "",
        f"{result['device']}{host}; torch {m.get('torch')}, DeepSpeed "
        f"{result['versions']['deepspeed']}, DALI {result['versions']['dali']}. {result['model']} at "
        f"{result['crop_size']} px, {result['precision']}, batch {result['train_batch_size']} per optimizer step "
        f"(micro-batch x accumulation), {result['train_images']} training JPEGs of 500x375. Median images/s of "
        f"{result['windows']} windows of {result['window']} optimizer steps after {result['warmup_steps']} warm-up "
        f"steps, in each of {result['repeats']} run(s) per measurement. Command: "
        f"`{result['command']}`.",
        "",
        "| micro-batch | DALI pipeline alone | synthetic input (DeepSpeed) | end to end | plain PyTorch AMP "
        "| end to end / synthetic | DeepSpeed / AMP | model TFLOP/s (synthetic) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['micro_batch']} | {r['dali_pipeline_img_s']:,.0f} | {r['synthetic_img_s']:,.0f} | "
            f"{r['end_to_end_img_s']:,.0f} | {r['baseline_amp_img_s']:,.0f} | {r['end_to_end_vs_synthetic']:.3f} | "
            f"{r['deepspeed_vs_amp']:.3f} | {r['synthetic_img_s'] * result['train_flop'] / 1e12:.1f} |"
        )
    lines += ["", *[f"- {v}" for v in verdicts(result)]]
    phased = [r for r in result["rows"] if "phases_ms" in r]
    if phased:
        lines += [
            "",
            "Where an optimizer step's time goes (ms; each phase ends in a device sync, so no overlap):",
            "",
            "| micro-batch | engine | forward | backward | optimizer step | sum |",
            "|---|---|---|---|---|---|",
        ]
        for r in phased:
            for name, p in r["phases_ms"].items():
                cells = " | ".join(f"{p[k]:.1f}" for k in PHASES)
                lines.append(f"| {r['micro_batch']} | {name} | {cells} | {sum(p.values()):.1f} |")
    if result["levers"]:
        lines += ["", f"Levers at micro-batch {result['lever_micro_batch']}, each against its first setting:", "",
                  "| lever | measured | setting | images/s | vs first |", "|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {x['lever']} | {x['mode']} | {x['setting']} | {x['img_s']:,.0f} | {x['vs_default']:.3f} |"
                  for x in result["levers"]]  # fmt: skip
    for note in result["notes"]:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Measure every micro-batch and lever, then write the results."""
    args = parse_args(argv)
    bench = Bench(args)
    rows = [bench.row(micro) for micro in args.micro_batches]
    levers = bench.levers()
    import deepspeed
    import nvidia.dali

    info = machine()
    best = max(rows, key=lambda r: r["end_to_end_img_s"])
    result = {
        "device": info["gpu"] or f"CPU only ({info['cpu']}, {info['cores']} cores)",
        "gpu": bool(info["gpu"]),
        "date": datetime.date.today().isoformat(),
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
        "micro_batch": best["micro_batch"],
        **{f"{m}_img_s": best[f"{m}_img_s"] for m in MODES},
        "best": {k: v for k, v in best.items() if k != "details"},
        "rows": rows,
        "lever_micro_batch": args.lever_micro_batch,
        "levers": levers,
        "notes": bench.notes,
        "machine": info,
        "versions": {"deepspeed": deepspeed.__version__, "dali": nvidia.dali.__version__},
    }
    if result["gpu"]:
        result["share_of_matrix_rate"] = best["synthetic_img_s"] * result["train_flop"] / HOPPER_MATRIX_FLOP_S
    result["verdicts"] = verdicts(result)
    stem = Path(args.results) / f"{result['date']}-{device_slug(info)}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    for row in rows:
        if "profile" in row:
            profile = Path(f"{stem}-profile-mb{row['micro_batch']}.txt")
            profile.write_text(row.pop("profile"))
            row["profile_file"] = profile.name
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    Path(f"{stem}.md").write_text(text)
    print(text)
    print(f"written: {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child_main(sys.argv[2]))
    sys.exit(main())
