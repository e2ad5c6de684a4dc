"""Train an ImageNet classifier with DeepSpeed on DALI batches: the large-minibatch recipe of Goyal et al.

    deepspeed [--hostfile hosts] [--num_gpus N] pipeline/train.py --deepspeed_config ds_configs/bs8k.json --data-dir DIR
    srun python pipeline/train.py ...   (SLURM, one task per GPU)    mpirun ... python pipeline/train.py ...
    torchrun --nproc_per_node N pipeline/train.py --deepspeed_config ds_configs/bs256.json --data-dir DIR
    python pipeline/train.py --deepspeed_config ds_configs/cpu.json --data-dir DIR   (one process)

`main` reads parse -> assemble -> train -> close. Run options come from `--config run.yaml` and the flags
(pipeline/config.py); outputs go to --out-dir.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum, IntEnum
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from pipeline import (
    checkpoint,
    config,
    deepspeed_json,
    distributed,
    ema,
    ending,
    engine,
    launch,
    loss_scale,
    schedule,
    tracking,
)
from pipeline.data import IGNORE, DataConfig, DataError, ImageNetData, ShardSet, decode_device, open_shards
from pipeline.faults import Guard, NumericFault
from pipeline.meters import StepMeter, validate
from pipeline.model import build_model, check_arch, sync_batch_norm, uses_channels_last
from pipeline.tracking import Sinks, exposed_key

# Share of an epoch's time the loop may wait for batches before the run says the input pipeline limits it.
INPUT_BOUND_SHARE = 0.05


def main(argv: list[str] | None = None, prepare: Callable[[Run], None] | None = None) -> int:
    """Parse, assemble, train, close. A run that cannot go on ends with one line and an exit status (Stop): 2 bad
    input, 3 a numeric fault, 4 ranks lost from the job. `prepare(run)`, if given, changes the built run before a
    resume restores it (the tests wrap its data reader, or register one more component)."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        run = assemble(*parse(argv), prepare=prepare)
        train(run)
    except Stop as stop:
        return stop.end()
    return 0


class Status(IntEnum):
    """A run's exit status when it ends early."""

    BAD_INPUT = 2
    NUMERIC_FAULT = 3
    RANKS_LOST = 4


class Speaker(Enum):
    """Who says a Stop's line: what every rank finds the same is said once, what differs per node or rank by each."""

    # Rank 0 (every rank finds the same).
    RANK_0 = "rank 0"
    # A node's first rank: what differs between nodes.
    EACH_NODE = "each node"
    # A rank's own.
    EVERY_RANK = "every rank"
    # The launcher's first task, before ranks exist.
    TASK_0 = "task 0"
    # Nobody: said already.
    SAID = "said"

    def speaks(self) -> bool:
        """Whether this process says the line."""
        return {
            Speaker.RANK_0: lambda: os.environ.get("RANK", "0") == "0",
            Speaker.EACH_NODE: launch.first_on_node,
            Speaker.EVERY_RANK: lambda: True,
            Speaker.TASK_0: launch.first_task,
            Speaker.SAID: lambda: False,
        }[self]()


# How long a rank that leaves a Stop's line to another (rank 0, its node's first rank) waits before it exits. A
# launcher ends a node's ranks once one of them fails (DeepSpeed's within its 1 s poll, torchrun and mpirun too): had
# the quiet rank exited first, the speaker would be ended before its line. The speaker's exit ends the wait.
SPEAKER_WAIT_S = 10


class Stop(Exception):
    """A run that ends early: its one line, its exit status, and who says it."""

    def __init__(self, line: str, status: Status, who: Speaker):
        super().__init__(line)
        self.line, self.status, self.who = line, status, who

    def end(self) -> int:
        """Print the line (stderr) where `who` says; on a rank that leaves it to another, wait for the speaker
        (SPEAKER_WAIT_S) with nothing more to say: a SIGTERM from the launcher ends it at once. Returns the exit
        status."""
        if self.who.speaks():
            print(f"error: {self.line}", file=sys.stderr, flush=True)
        elif self.who is not Speaker.SAID:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(SPEAKER_WAIT_S)
        return int(self.status)


# ---- parse: everything cheap, before any rank waits for another ----


def parse(argv: list[str] | None) -> tuple[config.RunConfig, dict, list[str]]:
    """The launch, the run options and the DeepSpeed configuration fitted to this world and host (once), with the
    notes of what fitting changed. Before the process group forms, so that a bad option, a batch the ranks cannot
    share or a GPU configuration on a host where CUDA is not usable stops at once, said once."""
    try:
        # First of all: the world size and this task's rank come from its launcher.
        launch.adopt()
    except launch.LaunchError as e:
        raise Stop(str(e), Status.BAD_INPUT, Speaker.TASK_0) from e
    try:
        opts = config.load(argv)
        check_arch(opts.model.arch)
        cuda = torch.cuda.is_available()
        ds, notes = deepspeed_json.configure(
            config.read_ds_config(opts.deepspeed.deepspeed_config),
            opts.deepspeed.deepspeed_config,
            int(os.environ["WORLD_SIZE"]),
            cuda,
            opts.deepspeed.allow_cpu,
            opts.loss_scale.loss_scale_window,
        )
        # Refused here, before any rank waits for another, where the GPU is asked for and not usable.
        decode_device(opts.data.data_device, cuda, opts.deepspeed.allow_cpu)
    except ValueError as e:
        raise Stop(str(e), Status.BAD_INPUT, Speaker.RANK_0) from e
    return opts, ds, notes


# ---- assemble: the run's components, each built once ----


@dataclass
class Progress:
    """Where training stands, a checkpoint component: the data position (the epoch and the optimizer steps done in
    it, from the engine's step count as it is saved), the best validation top-1 so far and its epoch, and the
    training time of every session so far. `epoch` and `step_in_epoch` are where this session starts."""

    global_steps: Callable[[], int]
    steps_per_epoch: int
    epoch: int = 0
    step_in_epoch: int = 0
    best_top1: float | None = None
    best_epoch: int | None = None
    train_seconds: float = 0.0

    def state_dict(self) -> dict:
        epoch, step_in_epoch = divmod(self.global_steps(), self.steps_per_epoch)
        return {
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "train_seconds": self.train_seconds,
        }

    def load_state_dict(self, state: dict) -> None:
        for name in ("epoch", "step_in_epoch", "best_top1", "best_epoch", "train_seconds"):
            setattr(self, name, state.get(name, getattr(self, name)))

    def validated(self, epoch: int, top1: float | None) -> None:
        """Record an epoch's validation top-1 (None: not validated)."""
        if top1 is not None and (self.best_top1 is None or top1 > self.best_top1):
            self.best_top1, self.best_epoch = top1, epoch


class Lever(Protocol):
    """A checkpoint component that acts on the loop (pipeline.ema.Ema): after every optimizer step, and when the run
    validates (the keys it adds to the epoch's row). The loop calls every lever alike: no branch per lever."""

    def after_step(self, engine) -> None: ...

    def validated(self, data: ImageNetData, device: torch.device, flip: bool) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Stepper:
    """What takes an optimizer step and checks it: the engine, the loss, the loss scale, and the fault guard."""

    engine: object
    scale: loss_scale.LossScale
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    guard: Guard
    # Components that act on the loop (an average of the weights): after every optimizer step, and at validation.
    levers: list[Lever] = dataclasses.field(default_factory=list)

    def step(
        self, images: torch.Tensor, labels: torch.Tensor, meter: StepMeter, mark: Callable[[str], None] = None
    ) -> bool:
        """One micro-batch (train_step), then the levers if an optimizer step closed; whether one did."""
        closed = train_step(self.engine, self.scale, self.criterion, images, labels, meter, mark or no_mark)
        if closed:
            for lever in self.levers:
                lever.after_step(self.engine)
        return closed

    def record(self, meter: StepMeter, sinks: Sinks) -> None:
        """Read the meter's rows since the last record (a sync point), log them, then stop on a numeric fault
        among them."""
        rows = meter.flush()
        self.scale.resolve(rows)
        sinks.steps(rows)
        self.guard.check(rows)


@dataclass
class Run:
    """What a run is assembled from: its options, DeepSpeed configuration, data, schedule, engine and progress."""

    opts: config.RunConfig
    ds: dict
    notes: list[str]
    rank: int
    world: int
    cuda: bool
    channels_last: bool
    precision: str
    data: ImageNetData
    schedule: schedule.Schedule
    zeroed: int
    stepper: Stepper
    roll: distributed.RollCall
    progress: Progress
    # Its checkpoints, and everything a resume restores besides DeepSpeed's own state (checkpointer.components).
    checkpointer: checkpoint.Checkpointer
    cadence: Cadence

    @property
    def components(self) -> checkpoint.Components:
        return self.checkpointer.components

    @property
    def out(self) -> Path:
        return Path(self.opts.checkpoint.out_dir)

    @property
    def engine(self):
        return self.stepper.engine

    @property
    def micro(self) -> int:
        return self.ds["train_micro_batch_size_per_gpu"]

    @property
    def accum(self) -> int:
        return self.ds["gradient_accumulation_steps"]

    def describe(self) -> dict:
        """The run options, the DeepSpeed configuration as run and the derived numbers, for config.yaml and wandb."""
        return {
            "run": dataclasses.asdict(self.opts),
            "deepspeed": self.ds,
            "schedule": self.schedule.as_dict(),
            "derived": {
                "world_size": self.world,
                "grad_accum": self.accum,
                "precision": self.precision,
                "train_images": self.data.shards.splits["train"].images,
                "val_images": self.data.shards.splits["validation"].images,
                "num_classes": self.data.num_classes,
                "zero_init_residual_blocks": self.zeroed,
                "channels_last": self.channels_last,
                "data": dataclasses.asdict(self.data.config),
                "data_threads": self.data.threads,
                "decoder_memory": self.data.decoder_memory(),
                "notes": self.notes,
            },
        }


def assemble(opts: config.RunConfig, ds: dict, notes: list[str], prepare: Callable[[Run], None] | None = None) -> Run:
    """Open the shards, join the process group, build the run's components, let `prepare` change them, continue
    from --resume, and (rank 0) say what the run is."""
    try:
        shards = open_shards(opts.data.data_dir, num_classes=opts.data.num_classes)
    except (ValueError, DataError) as e:
        # A node's own view of the data (shared storage not mounted there).
        raise Stop(str(e), Status.BAD_INPUT, Speaker.EACH_NODE) from e
    try:
        lr_schedule, ds, fitted = fit_schedule(
            opts.schedule, ds, opts.deepspeed.deepspeed_config, shards.splits["train"].images
        )
    except ValueError as e:
        raise Stop(str(e), Status.BAD_INPUT, Speaker.RANK_0) from e
    try:
        rank, world = distributed.init(opts.cluster.dist_timeout, opts.cluster.join_timeout)
    except distributed.JoinError as e:
        raise Stop(str(e), Status.RANKS_LOST, Speaker.EACH_NODE) from e
    try:
        run = build(opts, ds, [*notes, *fitted], rank, world, shards, lr_schedule)
        run.out.mkdir(parents=True, exist_ok=True)
        if prepare is not None:
            prepare(run)
        resume(run)
    except (ValueError, DataError) as e:
        distributed.close()
        raise Stop(str(e), Status.BAD_INPUT, Speaker.EVERY_RANK) from e
    if rank == 0:
        announce(run)
    return run


def fit_schedule(
    options: schedule.ScheduleOptions, ds: dict, ds_path: str, train_images: int
) -> tuple[schedule.Schedule, dict, list[str]]:
    """The run's lr schedule fitted to its data and epochs, the configuration that builds it, and what fitting
    changed (pipeline/schedule.py)."""
    steps = options.steps(ds["train_batch_size"], train_images)
    return schedule.fit(options.schedule, ds, ds_path, steps)


def build(
    opts: config.RunConfig,
    ds: dict,
    notes: list[str],
    rank: int,
    world: int,
    shards: ShardSet,
    lr_schedule: schedule.Schedule,
) -> Run:
    """The components: data on this rank's slice, the model and its engine with the run's schedule."""
    model_options, scale_options = opts.model, opts.loss_scale
    cuda = torch.cuda.is_available()
    # NHWC from DALI through every convolution: the layout Tensor Cores read without transposes.
    channels_last = uses_channels_last(model_options.memory_format, cuda)
    if cuda:
        # Fixed input shapes: cuDNN times its algorithms once and keeps the fastest (numerics: the chosen
        # convolution algorithms, and so the last bits of the results, may differ from run to run).
        torch.backends.cudnn.benchmark = True
    deepspeed_json.check_combination(ds, opts.deepspeed.deepspeed_config, channels_last, model_options.compile)
    precision = deepspeed_json.precision(ds)
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    device, note = decode_device(opts.data.data_device, cuda, opts.deepspeed.allow_cpu)
    notes = [*notes, *filter(None, [note])]
    layout = "NHWC" if channels_last else "NCHW"
    data_config = DataConfig.of(
        opts.data, batch_size=micro, dtype=deepspeed_json.DATA_DTYPES[precision], layout=layout, data_device=device
    )
    data = ImageNetData(data_config, rank, world, grad_accum=accum, shards=shards)
    # The same initial weights on every rank and in every session with this seed.
    torch.manual_seed(opts.data.seed)
    model, zeroed = build_model(model_options.arch, data.num_classes, blurpool=model_options.blurpool)
    if model_options.sync_bn:
        model = sync_batch_norm(model, cuda)
    eng = engine.build(
        model,
        ds,
        lr_schedule,
        model_options.optimizer,
        model_options.lars_trust,
        model_options.compile,
        channels_last=channels_last,
    )
    loss_scale.set_growth_interval(eng, scale_options.loss_scale_window)
    # The probe, here and once: does this DeepSpeed multiply the fp16 wrapper's loss by its scale itself? (a backward
    # pass and an all-reduce on every rank)
    deepspeed_scales = loss_scale.wrapper_scale(eng) is not None and loss_scale.deepspeed_scales_loss(eng)
    stepper = Stepper(
        engine=eng,
        scale=loss_scale.LossScale(eng, scale_options.loss_scale_window, deepspeed_scales),
        criterion=functools.partial(cross_entropy, label_smoothing=model_options.label_smoothing),
        guard=Guard(precision, scale_options.max_skipped_steps, ds.get("fp16", {}).get("min_loss_scale", 1.0)),
    )
    progress = Progress(lambda: eng.global_steps, lr_schedule.steps_per_epoch)
    components = {
        # First: a checkpoint of another schedule is refused before anything else is restored.
        "schedule": schedule.Followed(eng, lr_schedule),
        "progress": progress,
        "loss_scale": stepper.scale,
        "guard": stepper.guard,
    }
    if data.config.ramp is not None:
        components["resolution_ramp"] = data.config.ramp
    if opts.ema.ema_decay:
        stepper.levers.append(ema.Ema(eng.module, opts.ema.ema_decay, opts.ema.ema_every, precision))
        components["ema"] = stepper.levers[-1]
    card = checkpoint.model_card(
        model_options.arch,
        data.num_classes,
        data.shards.class_names,
        data.config.val_crop,
        opts.data.val_resize,
        precision,
        micro,
        blurpool=model_options.blurpool,
        flip=opts.tracking.val_flip,
    )
    keep = opts.checkpoint.keep_checkpoints
    # DeepSpeed formed its own groups: they give up on a silent peer after --dist-timeout too.
    distributed.apply_timeout(opts.cluster.dist_timeout)
    # Heartbeats, so that a rank whose collective fails can say which ranks were lost.
    roll = distributed.RollCall(rank, world)
    return Run(
        opts,
        ds,
        notes,
        rank,
        world,
        cuda,
        channels_last,
        precision,
        data,
        lr_schedule,
        zeroed,
        stepper,
        roll,
        progress,
        checkpoint.Checkpointer(eng, Path(opts.checkpoint.out_dir) / "checkpoints", components, card, keep),
        Cadence.of(opts, lr_schedule.steps_per_epoch),
    )


def resume(run: Run) -> None:
    """Continue from --resume's checkpoint, if any: DeepSpeed's state and every component's."""
    run.notes += run.checkpointer.resume(run.opts.checkpoint.resume)
    # A checkpoint of another memory layout (or DeepSpeed's loading) can leave momentum laid out unlike its weight.
    engine.match_state_layout(run.engine.optimizer)


def announce(run: Run) -> None:
    """Rank 0: config.yaml and lr.png in the run folder; the notes and the schedule line on the console."""
    run.notes += filter(None, [exposed_key()])
    run.opts.dump(run.out / "config.yaml", **{k: v for k, v in run.describe().items() if k != "run"})
    schedule.plot(run.schedule, run.out / "lr.png")
    for note in run.notes:
        print(f"note: {note}")
    batch = f"B={run.ds['train_batch_size']} = {run.world} ranks x {run.micro} x {run.accum} accumulation"
    s = run.schedule
    warmup = f"{s.warmup_steps} warmup steps: {s.warmup_steps / s.steps_per_epoch:g} epochs"
    gammas = f"{run.zeroed} residual BN gammas zeroed"
    print(f"schedule {run.schedule.describe()} ({warmup}); {batch}; {run.precision}; {gammas}")


# ---- train: the epoch loop and the step ----


def train(run: Run) -> None:
    """Train every epoch, then close. A numeric fault stops the run with exit status 3, bad data with 2, ranks lost
    from the job (a node died or its link went down) with 4."""
    sinks = open_run_sinks(run)
    fault = ending.FaultLine(sinks)
    ending.stop_on_signal(fault, run.rank, run.world, run.out / "checkpoints", lambda: run.engine.global_steps)
    try:
        summary = epoch_loop(run.stepper, run.data, run.progress, run.checkpointer, run.cadence, sinks)
    except (NumericFault, DataError) as e:
        sinks.summary({"fault": str(e)})
        sinks.close()
        distributed.close()
        # A numeric fault is the same on every rank (its values are all-reduced); bad data is this rank's own.
        if isinstance(e, NumericFault):
            raise Stop(str(e), Status.NUMERIC_FAULT, Speaker.RANK_0) from e
        raise Stop(str(e), Status.BAD_INPUT, Speaker.EVERY_RANK) from e
    except RuntimeError as e:
        if distributed.lost_peer(e) is None:
            raise
        checkpoints, step, timeout = run.out / "checkpoints", run.engine.global_steps, run.opts.cluster.dist_timeout
        line = ending.lost_ranks(fault, sinks, run.roll, checkpoints, step, timeout)
        raise Stop(line, Status.RANKS_LOST, Speaker.SAID) from e
    close(run.roll, sinks, summary, run.out)


def epoch_loop(
    stepper: Stepper,
    data: ImageNetData,
    progress: Progress,
    checkpointer: checkpoint.Checkpointer,
    cadence: Cadence,
    sinks: Sinks,
) -> dict:
    """Train, validate, record and checkpoint each epoch from where `progress` starts; returns the summary line."""
    eng, rows, cuda = stepper.engine, [], stepper.engine.device.type == "cuda"
    began, (first, done) = time.perf_counter(), (progress.epoch, progress.step_in_epoch)
    world, micro = data.world_size, data.config.batch_size
    for epoch in range(first, cadence.epochs):
        skip = done if epoch == first else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        meter = StepMeter(world * micro, cadence.steps_per_epoch, eng.device)
        sinks.progress(cadence.steps_per_epoch, epoch, initial=skip, run_total=cadence.last_step)
        batches = epoch_batches(data, epoch, skip * data.grad_accum)
        stop = train_epoch(stepper, batches, meter, sinks, cadence, save=checkpointer.save)
        last = stop or epoch + 1 == cadence.epochs
        validating, extra = cadence.validates(epoch, last), {}
        top1, top5 = evaluate(eng, data, cadence.val_flip) if validating else (None, None)
        for lever in stepper.levers if validating else []:
            extra.update(lever.validated(data, eng.device, cadence.val_flip))
        progress.validated(epoch, top1)
        row = epoch_row(eng, world, micro, stepper.scale, epoch, meter, (top1, top5))
        # The sizes each figure was measured at: the training crops of the epoch (img/s per size), the validation's.
        sides = data.crop_sides(epoch)
        row.update(train_crop=sides[0] if len(sides) == 1 else sides, val_crop=data.config.val_crop, **extra)
        progress.train_seconds += time.perf_counter() - began
        began = time.perf_counter()
        # Training and validation time of the run so far, every session's (time to accuracy reads it).
        row["train_wall_s"] = round(progress.train_seconds, 2)
        rows.append(row)
        sinks.epoch(row, eng.global_steps)
        if row["data_wait_share"] > INPUT_BOUND_SHARE:
            sinks.note(input_bound_line(data, cuda, row))
        if cadence.saves(epoch, last):
            checkpointer.save()
        if stop:
            break
    speed = sum(r["images_per_sec"] for r in rows) / len(rows) if rows else None
    return {
        "summary": True,
        "best_top1": progress.best_top1,
        "best_epoch": progress.best_epoch,
        "last_top1": rows[-1]["val_top1"] if rows else None,
        "steps": eng.global_steps,
        "skipped_steps": stepper.scale.skipped,
        "images_per_sec": speed,
        "train_wall_s": round(progress.train_seconds, 1),
    }


def epoch_batches(data: ImageNetData, epoch: int, done: int) -> Iterator:
    """An epoch's training batches after the first `done` micro-batches. Resuming mid-epoch: an epoch's batches are
    the same in every session, so those already trained on are read and dropped."""
    batches = data.train_epoch(epoch)
    for _ in range(done):
        next(batches)
    return batches


@dataclass(frozen=True)
class Cadence:
    """When the loop records, validates and checkpoints, and where it stops (0: never)."""

    epochs: int
    steps_per_epoch: int
    log_every: int
    eval_every: int
    save_every: int
    save_every_epochs: int
    max_steps: int
    # Validation with its mirror images (test-time augmentation).
    val_flip: bool = False

    @classmethod
    def of(cls, opts: config.RunConfig, steps_per_epoch: int) -> Cadence:
        tracking, saving = opts.tracking, opts.checkpoint
        return cls(
            opts.schedule.epochs,
            steps_per_epoch,
            tracking.log_every,
            tracking.eval_every,
            saving.save_every_steps,
            saving.save_every_epochs,
            opts.schedule.max_steps,
            tracking.val_flip,
        )

    @property
    def last_step(self) -> float:
        """The step the run ends at: its last epoch's, or --max-steps."""
        return min(self.epochs * self.steps_per_epoch, self.max_steps or math.inf)

    def validates(self, epoch: int, last: bool) -> bool:
        """Validate after this epoch: every --eval-every epochs, and always after the last."""
        return last or (epoch + 1) % self.eval_every == 0

    def saves(self, epoch: int, last: bool) -> bool:
        """Checkpoint after this epoch: every --save-every-epochs epochs, and always after the last."""
        return last or (epoch + 1) % self.save_every_epochs == 0


def train_epoch(
    stepper: Stepper, batches: Iterator, meter: StepMeter, sinks: Sinks, cadence: Cadence, save: Callable[[], None]
) -> bool:
    """One epoch's optimizer steps: recorded every --log-every steps and before every --save-every-steps
    checkpoint, and at the epoch's end; returns whether --max-steps was reached."""
    eng, every, max_steps = stepper.engine, cadence.save_every, cadence.max_steps
    eng.train()
    for images, labels in meter.timed(batches):
        if not stepper.step(images, labels, meter):
            continue
        saving = every and eng.global_steps % every == 0
        if saving or eng.global_steps % cadence.log_every == 0:
            stepper.record(meter, sinks)  # sync point: every --log-every steps and before a checkpoint
        if saving:
            save()
        if max_steps and eng.global_steps >= max_steps:
            break
    stepper.record(meter, sinks)  # sync point: the epoch's last steps
    return bool(max_steps and eng.global_steps >= max_steps)


def no_mark(phase: str) -> None:
    """train_step's default phase hook: nothing."""


def train_step(
    eng,
    scale: loss_scale.LossScale,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    meter: StepMeter,
    mark: Callable[[str], None] = no_mark,
) -> bool:
    """One micro-batch: forward, loss, backward and DeepSpeed's step (the optimizer's at the accumulation
    boundary, then the schedule and the step's row of the meter); returns whether an optimizer step closed.
    The one training step: the epoch loop and the throughput benchmark's harnesses all call it; `mark(phase)` is
    called as "forward", "backward" and "optimizer" end (the benchmark's phase timer syncs and reads a clock there).
    No host-device sync in the autocast modes with fused SGD (the fp16/bf16 wrapper syncs in its step)."""
    boundary, lr = eng.is_gradient_accumulation_boundary(), engine.lr(eng)
    images, labels = images.to(eng.device, non_blocking=True), labels.to(eng.device, non_blocking=True)
    logits = eng(images)
    loss = criterion(logits, labels)
    mark("forward")
    # Numerics: the fp16 wrapper's loss scale is applied here where DeepSpeed does not apply it (LossScale).
    eng.backward(scale.for_backward(loss))
    mark("backward")
    eng.step()
    meter.micro_step(loss, logits, labels)
    if boundary:
        schedule.follow(eng)
        meter.optimizer_step(eng.global_steps, lr, *scale.now())
    mark("optimizer")
    return boundary


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy in fp32 (numerics: fp16 logits are upcast first), skipping padding labels."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing, ignore_index=IGNORE)


def evaluate(eng, data: ImageNetData, flip: bool = False) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) over the whole validation set, counted exactly across ranks, of the
    model the checkpoint saves (rank 0's batch-norm statistics on every rank); `flip`: with mirror images too."""
    eng.eval()
    with distributed.rank0_buffers(eng.module):
        top1, top5, _ = validate(eng, data.validation(), eng.device, flip)
    eng.train()
    return top1, top5


def epoch_row(
    eng, world: int, micro: int, scale: loss_scale.LossScale, epoch: int, meter: StepMeter, accuracy: tuple
) -> dict:
    """The epoch's line of metrics.jsonl: losses, accuracy (top-1, top-5 or None) and waits averaged over the
    `world` ranks, and images/s over all of them (`micro` images per rank per micro-step). A sync point."""
    seconds = meter.elapsed()
    totals = [meter.loss_sum.item(), meter.micro_steps, meter.waited]
    loss_sum, micro_steps, waited = distributed.all_sum(totals, eng.device)
    # Host-side peak of this rank's allocations this epoch (no device sync); None on a CPU.
    peak = torch.cuda.max_memory_allocated() if eng.device.type == "cuda" else None
    return {
        "epoch": epoch,
        "train_loss": loss_sum / max(micro_steps, 1),
        "val_top1": accuracy[0],
        "val_top5": accuracy[1],
        "lr": engine.lr(eng),
        "images_per_sec": meter.micro_steps * world * micro / seconds,
        "data_wait_share": waited / world / seconds,
        "peak_gpu_memory_bytes": peak,
        "skipped_steps": scale.skipped,
        "step": eng.global_steps,
    }


def input_bound_line(data: ImageNetData, cuda: bool, row: dict) -> str:
    """One line: the loop waited for batches this share of the epoch, and the knob to try first."""
    if not data.gpu and cuda:
        knob = "decode on the GPU (--data-device gpu)"
    elif data.gpu:
        knob = (
            f"raise --data-threads (now {data.threads}), --hw-decoder-load or --data-prefetch "
            f"(now {data.config.data_prefetch})"
        )
    else:
        knob = f"raise --data-threads (now {data.threads}) or decode on a GPU"
    return (
        f"note: epoch {row['epoch']}: the input pipeline limits throughput: the training loop waited for "
        f"batches {100 * row['data_wait_share']:.0f}% of the epoch's time; {knob}"
    )


# ---- close, and the ways a run ends early ----


def close(roll: distributed.RollCall, sinks: Sinks, summary: dict, out: Path) -> None:
    """Stop the roll call, write the summary, close wandb and the process group, and say where everything is."""
    roll.stop()
    sinks.summary(summary)
    sinks.close()
    sinks.note(done_line(summary, out, sinks.wandb_dir))
    distributed.close()


def done_line(summary: dict, out: Path, wandb: Path | None) -> str:
    """The run's last line: accuracy, and where its files are."""
    top1, best = summary["last_top1"], summary["best_top1"]
    result = f"val top-1 {top1:.1f}%" if top1 is not None else "no validation in this session"
    if best is not None:
        result += f" (best {best:.1f}% at epoch {summary['best_epoch']})"
    where = f"run folder {out} (config.yaml, metrics.jsonl, checkpoints/)"
    if wandb:
        where += f"; wandb files in {wandb}"
    return f"done: {result} after {summary['steps']} steps; {where}"


def open_run_sinks(run: Run) -> Sinks:
    """The run's metric sinks, active on rank 0 only (tracking.open_run_sinks), named by its keys."""
    return tracking.open_run_sinks(run.opts.tracking, run.out, run.rank, run_keys(run), run.describe())


def run_keys(run: Run) -> dict:
    """The flat keys a dashboard compares runs by (wandb's config, beside the full sections)."""
    model, steps = run.opts.model, run.opts.schedule
    return {
        "arch": model.arch,
        "global_batch": run.ds["train_batch_size"],
        "micro_batch": run.micro,
        "grad_accum": run.accum,
        "world_size": run.world,
        "precision": run.precision,
        "device": "GPU" if run.cuda else "CPU",
        "peak_lr": run.schedule.peak_lr,
        "epochs": steps.epochs,
        "warmup_epochs": run.schedule.warmup_steps / run.schedule.steps_per_epoch,
        "schedule_kind": run.schedule.kind,
        "optimizer": model.optimizer,
        "label_smoothing": model.label_smoothing,
        "crop_size": run.opts.data.crop_size,
        "channels_last": run.channels_last,
        "compile": model.compile,
    }


if __name__ == "__main__":
    ending.end_process(main())
