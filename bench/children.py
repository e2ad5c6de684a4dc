"""The measurements, each in a child process of its own (a fresh CUDA context and allocator):

    python bench/throughput.py --child SPEC.json   (bench/throughput.py starts each one)

dali_pipeline (the input pipeline alone), synthetic (train.py's run on a batch held on the device), baseline_amp
(plain PyTorch AMP) and phases (forward/backward/optimizer times). The DeepSpeed ones go through pipeline/train.py's
own train_step.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from bench.windows import Windows
from pipeline import deepspeed_json, train


def dali_child(spec: dict) -> dict:
    """The training input pipeline alone: `steps` optimizer steps' worth of micro-batches, timed in windows."""
    from pipeline.data import DataConfig, ImageNetData

    config = DataConfig(
        spec["data_dir"],
        batch_size=spec["micro"],
        crop_size=spec["crop"],
        val_resize=spec["crop"],
        dtype=deepspeed_json.DATA_DTYPES[spec["precision"]],
        layout="NHWC" if spec["channels_last"] else "NCHW",
        data_threads=spec["data_threads"],
    )
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
        self.optimizer = torch.optim.SGD(
            param_groups(model, sgd.get("weight_decay", 0.0)),
            lr=sgd["lr"],
            momentum=sgd.get("momentum", 0.9),
            nesterov=True,
            fused=self.gpu,
        )
        # The compute dtype of the DeepSpeed run it is compared with (fp16/bf16 in either DeepSpeed mode).
        self.half = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(
            deepspeed_json.DATA_DTYPES[spec["precision"]]
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.half == torch.float16)
        self.images, self.labels = _synthetic_batch(
            spec["micro"], spec["crop"], spec["num_classes"], self.half or torch.float32, True, device
        )
        self.done = 0

    def micro(self, mark) -> None:
        """One micro-batch: autocast forward, scaled backward (accumulated), and at the accumulation boundary the
        unscale, skip on overflow or step, scale update and cleared grads; `mark(phase)` as each phase ends."""
        import torch.nn.functional as F

        with torch.autocast(self.images.device.type, dtype=self.half, enabled=self.half is not None):
            logits = self.model(self.images)
        loss = F.cross_entropy(logits.float(), self.labels)
        mark("forward")
        self.scaler.scale(loss / self.accum).backward()
        mark("backward")
        self.done += 1
        if self.done % self.accum == 0:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        mark("optimizer")


class DeepSpeedSteps:
    """pipeline/train.py's own step (train.train_step) on its own engine, with synthetic input."""

    def __init__(self, spec: dict):
        from pipeline.meters import StepMeter

        try:
            self.run = train.assemble(*train.parse(spec["argv"]))
        except train.Stop as stop:
            raise SystemExit(stop.end()) from None
        self.gpu, run = torch.cuda.is_available(), self.run
        self.images, self.labels = synthetic_batch_of(run)
        self.meter = StepMeter(run.world * run.micro, run.schedule.steps_per_epoch, run.engine.device)

    def micro(self, mark) -> None:
        """One micro-batch through train.train_step."""
        self.run.stepper.step(self.images, self.labels, self.meter, mark)


def synthetic_batch_of(run) -> tuple:
    """One batch of random images, in the run's micro-batch, crop, dtype, layout and device."""
    dtype = getattr(torch, deepspeed_json.DATA_DTYPES[run.precision])
    crop, classes = run.opts.data.crop_size, run.data.num_classes
    return _synthetic_batch(run.micro, crop, classes, dtype, run.channels_last, run.engine.device)


def baseline_child(spec: dict) -> dict:
    """Plain PyTorch AMP (AmpSteps), timed in windows like the others."""
    amp = AmpSteps(spec)
    clock = Windows(spec["window"], spec["micro"] * spec["accum"], spec["steps_per_epoch"], amp.gpu)
    for step in range(1, spec["steps"] + 1):
        for _ in range(spec["accum"]):
            amp.micro(train.no_mark)
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
        for _ in range(spec["accum"]):
            mark(None)
            steps.micro(mark)
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
    """pipeline/train.py's own run (train.main: engine, loop, logging) with SyntheticInput in place of the DALI
    reader."""
    profilers = []

    def synthetic(run) -> None:
        profiler = _profiler(spec, run.accum) if spec.get("profile") else None
        run.data = SyntheticInput(run.data, synthetic_batch_of(run), profiler)
        if profiler is not None:
            profilers.append(profiler)
            profiler.start()

    status = train.main(spec["argv"], prepare=synthetic)
    for profiler in profilers:
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


CHILDREN = {
    "dali_pipeline": dali_child,
    "baseline_amp": baseline_child,
    "synthetic": synthetic_child,
    "phases": phases_child,
}


def child_main(spec_file: str) -> int:
    """Run one measurement from its spec file and write what it returns next to it."""
    spec = json.loads(Path(spec_file).read_text())
    result = CHILDREN[spec["mode"]](spec)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0
