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
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline import checkpoint, config, distributed, engine, gpu, launch, schedule
from pipeline.data import IGNORE, DataConfig, DataError, ImageNetData, ShardSet, open_shards
from pipeline.faults import Guard, NumericFault
from pipeline.meters import StepMeter, validate
from pipeline.model import build_model, check_arch, sync_batch_norm, uses_channels_last
from pipeline.tracking import PROJECT, Sinks, exposed_key, open_sinks, wandb_init_args, wandb_mode

# Share of an epoch's time the loop may wait for batches before the run says the input pipeline limits it.
INPUT_BOUND_SHARE = 0.05


def main(argv: list[str] | None = None, prepare: Callable[[Run], None] | None = None) -> int:
    """Parse, assemble, train, close. A run that cannot go on ends with one line and an exit status (Stop): 2 bad
    input, 3 a numeric fault, 4 ranks lost from the job. `prepare(run)`, if given, changes the assembled run just
    before it trains (the tests wrap its data reader)."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        run = assemble(*parse(argv))
        if prepare is not None:
            prepare(run)
        train(run)
    except Stop as stop:
        stop.say()
        return stop.status
    return 0


class Stop(Exception):
    """A run that ends early: its one line, its exit status, and who says it: "rank 0" (every rank finds the same),
    "each node" (a node's first rank: what differs between nodes), "every rank" (a rank's own), "task 0" (the
    launcher's first task, before ranks exist), or None (said already)."""

    def __init__(self, line: str, status: int, who: str | None):
        super().__init__(line)
        self.line, self.status, self.who = line, status, who

    def say(self) -> None:
        """Print the line (stderr) where `who` says."""
        speaks = {
            "rank 0": os.environ.get("RANK", "0") == "0",
            "each node": launch.first_on_node(),
            "every rank": True,
            "task 0": launch.first_task(),
            None: False,
        }[self.who]
        if speaks:
            print(f"error: {self.line}", file=sys.stderr, flush=True)


# ---- parse: everything cheap, before any rank waits for another ----


def parse(argv: list[str] | None) -> tuple[config.RunConfig, dict, list[str]]:
    """The launch, the run options and the DeepSpeed configuration fitted to this world and host (once), with the
    notes of what fitting changed. Before the process group forms, so that a bad option, a batch the ranks cannot
    share or a GPU configuration on a host where CUDA is not usable stops at once, said once."""
    try:
        # First of all: the world size and this task's rank come from its launcher.
        launch.adopt()
    except launch.LaunchError as e:
        raise Stop(str(e), 2, "task 0") from e
    try:
        opts = config.load(argv)
        optim = opts.optim
        check_arch(optim.arch)
        cuda = torch.cuda.is_available()
        ds, notes = engine.configure(
            config.read_ds_config(optim.deepspeed_config),
            optim.deepspeed_config,
            int(os.environ["WORLD_SIZE"]),
            cuda,
            optim.allow_cpu,
            optim.loss_scale_window,
        )
        if opts.data.device == "gpu" and not cuda and not optim.allow_cpu:
            raise ValueError(gpu.refusal("--data-device gpu"))
    except ValueError as e:
        raise Stop(str(e), 2, "rank 0") from e
    return opts, ds, notes


# ---- assemble: the run's components, each built once ----


@dataclass
class Progress:
    """Where training stands, restored by a resume: the epoch and the optimizer steps done in it, the best
    validation top-1 so far and its epoch, and the training time of every session so far."""

    epoch: int = 0
    step_in_epoch: int = 0
    best_top1: float | None = None
    best_epoch: int | None = None
    train_seconds: float = 0.0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, state.get(f.name, getattr(self, f.name)))

    def validated(self, epoch: int, top1: float | None) -> None:
        """Record an epoch's validation top-1 (None: not validated)."""
        if top1 is not None and (self.best_top1 is None or top1 > self.best_top1):
            self.best_top1, self.best_epoch = top1, epoch


@dataclass
class Stepper:
    """What takes an optimizer step and checks it: the engine, the loss, the loss scale, and the fault guard."""

    engine: object
    scale: engine.LossScale
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    guard: Guard

    def step(
        self, images: torch.Tensor, labels: torch.Tensor, meter: StepMeter, mark: Callable[[str], None] = None
    ) -> bool:
        """One micro-batch (train_step); whether an optimizer step closed."""
        return train_step(self.engine, self.scale, self.criterion, images, labels, meter, mark or no_mark)

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
    progress: Progress = field(default_factory=Progress)

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


def assemble(opts: config.RunConfig, ds: dict, notes: list[str]) -> Run:
    """Open the shards, join the process group, build the run's components, continue from --resume, and (rank 0)
    say what the run is."""
    try:
        shards = open_shards(opts.data.data_dir, num_classes=opts.data.num_classes)
    except (ValueError, DataError) as e:
        # A node's own view of the data (shared storage not mounted there).
        raise Stop(str(e), 2, "each node") from e
    try:
        lr_schedule, ds, fitted = fit_schedule(opts.optim, ds, shards.splits["train"].images)
    except ValueError as e:
        raise Stop(str(e), 2, "rank 0") from e
    try:
        rank, world = distributed.init(opts.cluster.dist_timeout, opts.cluster.join_timeout)
    except distributed.JoinError as e:
        raise Stop(str(e), 4, "each node") from e
    try:
        run = build(opts, ds, [*notes, *fitted], rank, world, shards, lr_schedule)
        run.out.mkdir(parents=True, exist_ok=True)
        resume(run)
    except (ValueError, DataError) as e:
        distributed.close()
        raise Stop(str(e), 2, "every rank") from e
    if rank == 0:
        announce(run)
    return run


def fit_schedule(optim: engine.OptimOptions, ds: dict, train_images: int) -> tuple[schedule.Schedule, dict, list[str]]:
    """The run's lr schedule fitted to its data and epochs, the configuration that builds it, and what fitting
    changed (pipeline/schedule.py)."""
    steps = schedule.RunSteps(
        ds["train_batch_size"],
        train_images,
        optim.epochs,
        optim.warmup_epochs,
        optim.reference_batch,
        optim.reference_lr,
    )
    return schedule.fit(optim.schedule, ds, optim.deepspeed_config, steps)


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
    optim = opts.optim
    cuda = torch.cuda.is_available()
    # NHWC from DALI through every convolution: the layout Tensor Cores read without transposes.
    channels_last = uses_channels_last(optim.memory_format, cuda)
    if cuda:
        # Fixed input shapes: cuDNN times its algorithms once and keeps the fastest (numerics: the chosen
        # convolution algorithms, and so the last bits of the results, may differ from run to run).
        torch.backends.cudnn.benchmark = True
    engine.check_combination(ds, optim.deepspeed_config, channels_last, optim.compile)
    precision = engine.precision(ds)
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    device, note = data_device(opts.data.device, cuda)
    notes = [*notes, *filter(None, [note])]
    layout = "NHWC" if channels_last else "NCHW"
    data_config = DataConfig.of(
        opts.data, batch_size=micro, dtype=engine.DATA_DTYPES[precision], layout=layout, device=device
    )
    data = ImageNetData(data_config, rank, world, grad_accum=accum, shards=shards)
    # The same initial weights on every rank and in every session with this seed.
    torch.manual_seed(opts.data.seed)
    model, zeroed = build_model(optim.arch, data.num_classes)
    if optim.sync_bn:
        model = sync_batch_norm(model, cuda)
    eng = engine.build(
        model, ds, lr_schedule, optim.optimizer, optim.lars_trust, optim.compile, channels_last=channels_last
    )
    engine.set_growth_interval(eng, optim.loss_scale_window)
    stepper = Stepper(
        engine=eng,
        scale=engine.LossScale(eng),
        criterion=functools.partial(cross_entropy, label_smoothing=optim.label_smoothing),
        guard=Guard(precision, optim.max_skipped_steps, ds.get("fp16", {}).get("min_loss_scale", 1.0)),
    )
    # DeepSpeed formed its own groups: they give up on a silent peer after --dist-timeout too.
    distributed.apply_timeout(opts.cluster.dist_timeout)
    # Heartbeats, so that a rank whose collective fails can say which ranks were lost.
    roll = distributed.RollCall(rank, world)
    return Run(opts, ds, notes, rank, world, cuda, channels_last, precision, data, lr_schedule, zeroed, stepper, roll)


def data_device(requested: str, cuda: bool) -> tuple[str, str | None]:
    """Where decoding runs, and a note when that is not what --data-device asked: gpu on a host where CUDA is not
    usable decodes on the CPU (parse refused it there unless --allow-cpu)."""
    if requested == "gpu" and not cuda:
        return "cpu", "--allow-cpu: --data-device gpu without a usable GPU; decoding on the CPU"
    return requested, None


def resume(run: Run) -> None:
    """Continue from --resume's checkpoint, if any, refusing one made with a different schedule."""
    if not run.opts.checkpoint.resume:
        return
    path = checkpoint.find(run.opts.checkpoint.resume, run.out / "checkpoints")
    if path is None:
        if run.rank == 0:
            print(f"--resume auto: no complete checkpoint in {run.out / 'checkpoints'} yet; starting afresh")
        return
    state = checkpoint.load(run.engine, path)
    if state.get("schedule") != run.schedule.as_dict():
        raise ValueError(
            f"--resume {path}: it was trained on schedule {state.get('schedule')}, this run derives "
            f"{run.schedule.as_dict()}; resume with its --epochs, --schedule and DeepSpeed config, or a new --out-dir"
        )
    run.progress.load_state_dict(state)
    scale = run.stepper.scale
    scale.load_state_dict(state.get("loss_scale", {}))
    # The checkpoint brought back its loss-scale window; the flag of this session wins.
    engine.set_growth_interval(run.engine, run.opts.optim.loss_scale_window)
    run.stepper.guard.skipped = scale.skipped
    # A checkpoint of another memory layout (or DeepSpeed's loading) can leave momentum laid out unlike its weight.
    engine.match_state_layout(run.engine.optimizer)
    schedule.follow(run.engine)


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
    fault = FaultLine(sinks)
    stop_on_signal(run, fault)
    try:
        summary = epoch_loop(run, sinks)
    except (NumericFault, DataError) as e:
        sinks.summary({"fault": str(e)})
        sinks.close()
        distributed.close()
        # A numeric fault is the same on every rank (its values are all-reduced); bad data is this rank's own.
        if isinstance(e, NumericFault):
            raise Stop(str(e), 3, "rank 0") from e
        raise Stop(str(e), 2, "every rank") from e
    except RuntimeError as e:
        if distributed.lost_peer(e) is None:
            raise
        raise Stop(lost_ranks(run, sinks, fault), 4, None) from e
    close(run, sinks, summary)


def epoch_loop(run: Run, sinks: Sinks) -> dict:
    """Train, validate, record and checkpoint each epoch; returns the summary line."""
    opts, progress, eng, rows = run.opts, run.progress, run.engine, []
    began = time.perf_counter()
    for epoch in range(progress.epoch, opts.optim.epochs):
        skip = progress.step_in_epoch if epoch == progress.epoch else 0
        if run.cuda:
            torch.cuda.reset_peak_memory_stats()
        meter = StepMeter(run.world * run.micro, run.schedule.steps_per_epoch, eng.device)
        last_step = min(opts.optim.epochs * run.schedule.steps_per_epoch, opts.optim.max_steps or math.inf)
        sinks.progress(run.schedule.steps_per_epoch, epoch, initial=skip, run_total=last_step)
        batches = epoch_batches(run.data, epoch, skip * run.accum)
        stop = train_epoch(run.stepper, batches, meter, sinks, opts, save=functools.partial(save, run, epoch))
        last = stop or epoch + 1 == opts.optim.epochs
        top1, top5 = evaluate(run) if last or (epoch + 1) % opts.tracking.eval_every == 0 else (None, None)
        progress.validated(epoch, top1)
        rows.append(epoch_row(run, epoch, meter, top1, top5))
        sinks.epoch(rows[-1], eng.global_steps)
        if rows[-1]["data_wait_share"] > INPUT_BOUND_SHARE:
            sinks.note(input_bound_line(run.data, run.cuda, rows[-1]))
        progress.train_seconds += time.perf_counter() - began
        began = time.perf_counter()
        if last or (epoch + 1) % opts.checkpoint.save_every_epochs == 0:
            save(run, epoch)
        if stop:
            break
    speed = sum(r["images_per_sec"] for r in rows) / len(rows) if rows else None
    return {
        "summary": True,
        "best_top1": progress.best_top1,
        "best_epoch": progress.best_epoch,
        "last_top1": rows[-1]["val_top1"] if rows else None,
        "steps": eng.global_steps,
        "skipped_steps": run.stepper.scale.skipped,
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


def train_epoch(
    stepper: Stepper,
    batches: Iterator,
    meter: StepMeter,
    sinks: Sinks,
    opts: config.RunConfig,
    save: Callable[[], None],
) -> bool:
    """One epoch's optimizer steps: recorded every --log-every steps and before every --save-every-steps
    checkpoint, and at the epoch's end; returns whether --max-steps was reached."""
    eng, every = stepper.engine, opts.checkpoint.save_every_steps
    max_steps = opts.optim.max_steps
    eng.train()
    for images, labels in meter.timed(batches):
        if not stepper.step(images, labels, meter):
            continue
        saving = every and eng.global_steps % every == 0
        if saving or eng.global_steps % opts.tracking.log_every == 0:
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
    scale: engine.LossScale,
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


def evaluate(run: Run) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) over the whole validation set, counted exactly across ranks, of the
    model the checkpoint saves (rank 0's batch-norm statistics on every rank)."""
    run.engine.eval()
    with distributed.rank0_buffers(run.engine.module):
        top1, top5, _ = validate(run.engine, run.data.validation(), run.engine.device)
    run.engine.train()
    return top1, top5


def save(run: Run, epoch: int) -> None:
    """Checkpoint with the position to continue from: the epoch and the optimizer steps done in it."""
    done = run.engine.global_steps - epoch * run.schedule.steps_per_epoch
    position = (epoch + 1, 0) if done >= run.schedule.steps_per_epoch else (epoch, done)
    state = {
        **run.progress.state_dict(),
        "epoch": position[0],
        "step_in_epoch": position[1],
        "schedule": run.schedule.as_dict(),
        "run": dataclasses.asdict(run.opts),
        "loss_scale": run.stepper.scale.state_dict(),
        "model": model_card(run),
    }
    checkpoint.save(run.engine, run.out / "checkpoints", state, run.opts.checkpoint.keep_checkpoints)


def epoch_row(run: Run, epoch: int, meter: StepMeter, top1: float | None, top5: float | None) -> dict:
    """The epoch's line of metrics.jsonl: losses, accuracy and waits averaged over ranks (a sync point)."""
    seconds = meter.elapsed()
    totals = [meter.loss_sum.item(), meter.micro_steps, meter.waited]
    loss_sum, micro, waited = distributed.all_sum(totals, run.engine.device)
    # Host-side peak of this rank's allocations this epoch (no device sync); None on a CPU.
    peak = torch.cuda.max_memory_allocated() if run.cuda else None
    return {
        "epoch": epoch,
        "train_loss": loss_sum / max(micro, 1),
        "val_top1": top1,
        "val_top5": top5,
        "lr": engine.lr(run.engine),
        "images_per_sec": meter.micro_steps * run.world * run.micro / seconds,
        "data_wait_share": waited / run.world / seconds,
        "peak_gpu_memory_bytes": peak,
        "skipped_steps": run.stepper.scale.skipped,
        "step": run.engine.global_steps,
    }


def input_bound_line(data: ImageNetData, cuda: bool, row: dict) -> str:
    """One line: the loop waited for batches this share of the epoch, and the knob to try first."""
    if not data.gpu and cuda:
        knob = "decode on the GPU (--data-device gpu)"
    elif data.gpu:
        knob = (
            f"raise --data-threads (now {data.threads}), --hw-decoder-load or --data-prefetch "
            f"(now {data.config.prefetch})"
        )
    else:
        knob = f"raise --data-threads (now {data.threads}) or decode on a GPU"
    return (
        f"note: epoch {row['epoch']}: the input pipeline limits throughput: the training loop waited for "
        f"batches {100 * row['data_wait_share']:.0f}% of the epoch's time; {knob}"
    )


# ---- close, and the ways a run ends early ----


def close(run: Run, sinks: Sinks, summary: dict) -> None:
    """Write the summary, close wandb and the process group, and say where everything is."""
    run.roll.stop()
    sinks.summary(summary)
    sinks.close()
    sinks.note(done_line(summary, run.out, sinks.wandb_dir))
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


class FaultLine:
    """The one line a rank says when its job ends under it: the first to call `say` (the training path, or the
    SIGTERM watcher in a thread of its own) writes it to the sinks and, on a node's first rank, to stderr; later
    calls say nothing."""

    def __init__(self, sinks: Sinks):
        self.sinks, self.lock, self.said = sinks, threading.Lock(), False

    def say(self, line: str) -> bool:
        """Say `line` unless a line was said already; returns whether it was."""
        with self.lock:
            if self.said:
                return False
            self.said = True
        self.sinks.summary({"fault": line})
        if launch.first_on_node():
            print(line, file=sys.stderr, flush=True)
        return True


def stop_on_signal(run: Run, fault: FaultLine) -> None:
    """When the launcher or the scheduler stops this rank (SIGTERM: mpirun ending the job after it lost a node,
    scancel, a SLURM time limit), say so in one line per node and in metrics.jsonl (rank 0), with the checkpoint
    to resume from, before the SIGKILL that follows (1 s later under mpirun, whose own ending may cut the line off
    its output). Unless the rank had said its fault already: mpirun's SIGTERM usually comes while the rank calls
    the roll of the lost ranks (lost_ranks), so it says this line instead of that one.

    The line comes from a thread of its own: the main thread may be blocked in a collective that waits on a rank
    that is being stopped too, where Python's signal handlers never run. Python's own handler writes the signal's
    number to the wakeup socket (signal.set_wakeup_fd) whichever thread the signal interrupts."""
    receive, send = socket.socketpair()
    send.setblocking(False)
    signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
    # A handler of our own, so that SIGTERM does not end the process before the watcher has spoken.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)

    def watch(wakeup=send) -> None:
        # `wakeup` keeps the sending end open for as long as the watcher runs (its fd is Python's wakeup fd).
        while receive.recv(1) != bytes([signal.SIGTERM]):
            pass
        last = checkpoint.complete(run.out / "checkpoints")
        fault.say(
            f"error: rank {run.rank} of {run.world} on {distributed.where()}: stopped by the launcher (SIGTERM) at "
            f"step {run.engine.global_steps}; the job is over: rerun with --resume auto (last complete checkpoint: "
            f"{last[-1].name if last else 'none'})"
        )
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="sigterm", daemon=True).start()


def lost_ranks(run: Run, sinks: Sinks, fault: FaultLine) -> str:
    """A collective failed because ranks went away: one line per node (its first rank) naming the ranks and nodes
    lost (the roll call), then every survivor leaves together; returns the line. No close: the group is broken."""
    last = checkpoint.complete(run.out / "checkpoints")
    line = (
        f"rank {run.rank} of {run.world} on {distributed.where()}: a collective failed at step "
        f"{run.engine.global_steps}: lost {run.roll.lost()}; the job is over: when every node is back, rerun with "
        f"--resume auto (last complete checkpoint: {last[-1].name if last else 'none'})"
    )
    # Said now, before the wait: a launcher may end the survivors once one of them has left.
    fault.say(f"error: {line}")
    sinks.close()
    wait = run.opts.cluster.dist_timeout + 10
    if run.roll.store is None and not launch.first_on_node():
        # No store to wait on: leave the line to this node's first rank (the launcher ends this one when it exits).
        time.sleep(wait)
    run.roll.leave(wait)
    run.roll.stop()
    return line


def model_card(run: Run) -> dict:
    """What a checkpoint's weights need to be used without this run: the model, its classes, its input and its
    precision (saved with every checkpoint, in complete.json too; pipeline.evaluate and pipeline.export read it)."""
    return {
        "arch": run.opts.optim.arch,
        "num_classes": run.data.num_classes,
        "classes": list(run.data.shards.class_names),
        "crop_size": run.opts.data.crop_size,
        "val_resize": run.opts.data.val_resize,
        # What validation computed in, and its batch per rank: pipeline.evaluate repeats both.
        "precision": run.precision,
        "batch_size": run.micro,
    }


def open_run_sinks(run: Run) -> Sinks:
    """The run's metric sinks, active on rank 0 only. wandb: a flag wins, then wandb's own environment variables,
    then ours."""
    tracking, names = run.opts.tracking, wandb_names(run)
    mode = wandb_mode(tracking.wandb_mode)
    wandb_args = None
    if mode != "disabled":
        flags = {"mode": tracking.wandb_mode, "project": tracking.wandb_project, "group": tracking.wandb_group}
        defaults = {
            "mode": mode,
            "project": PROJECT,
            "group": names["group"],
            "name": names["name"],
            "tags": names["tags"],
            "dir": str(run.out),
            "id": None,
            "job_type": "train",
        }
        wandb_args = wandb_init_args(flags, defaults)
    return open_sinks(run.out, run.rank, wandb_args, {**names["config"], **run.describe()})


def wandb_names(run: Run) -> dict:
    """The run's name, group and tags in wandb, so a project dashboard compares runs by arch, global batch,
    precision and rank count as they come in, and the flat config keys to filter on."""
    optim, batch = run.opts.optim, run.ds["train_batch_size"]
    device = "GPU" if run.cuda else "CPU"
    flat = {
        "arch": optim.arch,
        "global_batch": batch,
        "micro_batch": run.micro,
        "grad_accum": run.accum,
        "world_size": run.world,
        "precision": run.precision,
        "device": device,
        "peak_lr": run.schedule.peak_lr,
        "epochs": optim.epochs,
        "warmup_epochs": run.schedule.warmup_steps / run.schedule.steps_per_epoch,
        "schedule_kind": run.schedule.kind,
        "optimizer": optim.optimizer,
        "label_smoothing": optim.label_smoothing,
        "crop_size": run.opts.data.crop_size,
        "channels_last": run.channels_last,
        "compile": optim.compile,
    }
    return {
        "name": f"{optim.arch} B={batch} {run.precision} {run.world}x{device}",
        "group": f"{optim.arch} B={batch}",
        "tags": [optim.arch, f"B={batch}", run.precision, f"{run.world}x{device}"],
        "config": flat,
    }


if __name__ == "__main__":
    sys.exit(main())
