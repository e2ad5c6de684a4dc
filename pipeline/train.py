"""Train an ImageNet classifier with DeepSpeed on DALI batches: the large-minibatch recipe of Goyal et al.

    deepspeed [--hostfile hosts] [--num_gpus N] pipeline/train.py --deepspeed_config ds_configs/bs8k.json --data-dir DIR
    torchrun --nproc_per_node N pipeline/train.py --deepspeed_config ds_configs/bs256.json --data-dir DIR
    python pipeline/train.py --deepspeed_config ds_configs/cpu.json --data-dir DIR   (one process)

Run options come from `--config run.yaml` and the flags (pipeline/config.py); outputs go to --out-dir.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline import checkpoint, config, distributed, engine, gpu, schedule
from pipeline.data import DataConfig, ImageNetData
from pipeline.faults import Guard, NumericFault
from pipeline.meters import StepMeter, validate
from pipeline.model import build_model, check_arch, sync_batch_norm, uses_channels_last
from pipeline.scaling import Recipe
from pipeline.shards import IGNORE, DataError, ShardSet, open_shards
from pipeline.tracking import PROJECT, Sinks, open_sinks, wandb_init_args, wandb_mode


def main(argv: list[str] | None = None) -> int:
    """Parse, build, train, close; bad input ends with a one-line error and exit status 2, a numeric fault 3."""
    run = start(argv)
    return run if isinstance(run, int) else train_to_end(run)


def start(argv: list[str] | None = None) -> Run | int:
    """Validate everything cheap first, then join the process group and build the run; an int is an exit status."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    first_rank, first_on_node = os.environ.get("RANK", "0") == "0", os.environ.get("LOCAL_RANK", "0") == "0"
    try:
        opts = config.load(argv)
        ds = config.read_ds_config(opts.optim.deepspeed_config)
        check_arch(opts.optim.arch)
        # Before the process group forms, so a bad batch/world pair (slots that do not divide the batch) or a GPU
        # configuration on a host where CUDA is not usable fails fast, said once: every rank finds the same.
        cuda = torch.cuda.is_available()
        o = opts.optim
        engine.fit(ds, o.deepspeed_config, int(os.environ.get("WORLD_SIZE", 1)), cuda, o.allow_cpu, o.loss_scale_window)
        if opts.data.device == "gpu" and not cuda and not opts.optim.allow_cpu:
            raise ValueError(gpu.refusal("--data-device gpu"))
    except ValueError as e:
        if first_rank:
            print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        shards = open_shards(opts.data.data_dir, num_classes=opts.data.num_classes)
    except (ValueError, DataError) as e:
        # A node's own view of the data (shared storage not mounted there): said once per node.
        if first_on_node:
            print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        rank, world = distributed.init(opts.cluster.dist_timeout, opts.cluster.join_timeout)
    except distributed.JoinError as e:
        if first_on_node:
            print(f"error: {e}", file=sys.stderr)
        return 4
    try:
        run = Run(opts, ds, rank, world, shards)
        run.out.mkdir(parents=True, exist_ok=True)
        resume(run)
    except (ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        distributed.close()
        return 2
    if rank == 0:
        opts.dump(run.out / "config.yaml", **{k: v for k, v in run.describe().items() if k != "run"})
        schedule.plot(run.schedule, run.out / "lr.png")
        for note in run.notes:
            print(f"note: {note}")
        batch = f"B={run.ds['train_batch_size']} = {world} ranks x {run.micro} x {run.accum} accumulation"
        warmup = f"--warmup-epochs {opts.optim.warmup_epochs:g}"
        print(f"schedule {run.schedule.describe()} ({warmup}); {batch}; {run.precision}; {run.zeroed} residual BN "
              "gammas zeroed")  # fmt: skip
    return run


class Run:
    """Everything a run is built from: options, data, schedule, engine, metric sinks, and where it starts."""

    def __init__(self, opts: config.RunConfig, ds_file: dict, rank: int, world: int, shards: ShardSet):
        self.opts, self.rank, self.world = opts, rank, world
        self.out = Path(opts.checkpoint.out_dir)
        self.cuda = torch.cuda.is_available()
        # NHWC from DALI through every convolution: the layout Tensor Cores read without transposes.
        self.channels_last = uses_channels_last(opts.optim.memory_format, self.cuda)
        if self.cuda:
            # Fixed input shapes: cuDNN times its algorithms once and keeps the fastest (numerics: the chosen
            # convolution algorithms, and so the last bits of the results, may differ from run to run).
            torch.backends.cudnn.benchmark = True
        o = opts.optim
        ds, self.notes = engine.fit(ds_file, o.deepspeed_config, world, self.cuda, o.allow_cpu, o.loss_scale_window)
        engine.check_combination(ds, opts.optim.deepspeed_config, self.channels_last, opts.optim.compile)
        self.precision = engine.precision(ds)
        self.micro, self.accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
        self.data = ImageNetData(self._data_config(), rank, world, grad_accum=self.accum, shards=shards)
        images = self.data.shards.splits["train"].images
        recipe = Recipe(ds["train_batch_size"], self.micro, epochs=o.epochs, warmup_epochs=o.warmup_epochs,
                        train_images=images, reference_batch=o.reference_batch,
                        reference_lr=o.reference_lr)  # fmt: skip
        self.schedule = schedule.derive(opts.optim.schedule, recipe)
        self.ds = engine.with_schedule(ds, self.schedule)
        # The same initial weights on every rank and in every session with this seed.
        torch.manual_seed(opts.data.seed)
        model, self.zeroed = build_model(opts.optim.arch, self.data.num_classes)
        if opts.optim.sync_bn:
            model = sync_batch_norm(model, self.cuda)
        self.engine = engine.build(model, self.ds, self.schedule, o.optimizer, o.lars_trust, o.compile,
                                   channels_last=self.channels_last)  # fmt: skip
        # Where training starts, the best accuracy so far and the training time so far (restored by a resume).
        self.start = {"epoch": 0, "step_in_epoch": 0, "best_top1": None, "best_epoch": None, "train_seconds": 0.0}
        engine.set_growth_interval(self.engine, o.loss_scale_window)
        self.scale = engine.LossScale(self.engine)
        self.criterion = functools.partial(cross_entropy, label_smoothing=o.label_smoothing)
        min_scale = self.ds.get("fp16", {}).get("min_loss_scale", 1.0)
        self.guard = Guard(self.precision, opts.optim.max_skipped_steps, min_scale)
        # DeepSpeed formed its own groups: they give up on a silent peer after --dist-timeout too.
        distributed.apply_timeout(opts.cluster.dist_timeout)
        # Heartbeats, so that a rank whose collective fails can say which ranks were lost.
        self.roll = distributed.RollCall(rank, world)

    def _data_config(self) -> DataConfig:
        """The run's data options with what it derives: the micro-batch, the precision's dtype, the model's memory
        layout, and the device decoding runs on."""
        return DataConfig.of(self.opts.data, batch_size=self.micro, dtype=engine.DATA_DTYPES[self.precision],
                             layout="NHWC" if self.channels_last else "NCHW", device=self._data_device())  # fmt: skip

    def _data_device(self) -> str:
        """--data-device; gpu on a host where CUDA is not usable decodes on the CPU (--allow-cpu: start checked)."""
        if self.opts.data.device == "gpu" and not self.cuda:
            self.notes.append("--allow-cpu: --data-device gpu without a usable GPU; decoding on the CPU")
            return "cpu"
        return self.opts.data.device

    def describe(self) -> dict:
        """The run config, the DeepSpeed config it ended up with and the derived numbers, for the log and wandb."""
        return {
            "run": dataclasses.asdict(self.opts),
            "deepspeed": self.ds,
            "schedule": self.schedule.as_dict(),
            "derived": {
                "world_size": self.world, "grad_accum": self.accum, "precision": self.precision,
                "train_images": self.data.shards.splits["train"].images,
                "val_images": self.data.shards.splits["validation"].images,
                "num_classes": self.data.num_classes, "zero_init_residual_blocks": self.zeroed,
                "channels_last": self.channels_last, "data": dataclasses.asdict(self.data.config),
                "data_threads": self.data.threads, "decoder_memory": self.data.decoder_memory(),
                "notes": self.notes,
            },
        }  # fmt: skip


def open_tracker(run: Run) -> Sinks:
    """Metric sinks: active on rank 0 only. wandb: a flag wins, then wandb's own environment variables, then ours."""
    o, names = run.opts, wandb_names(run)
    mode = wandb_mode(o.tracking.wandb_mode)
    wandb_args = None
    if mode != "disabled":
        flags = {"mode": o.tracking.wandb_mode, "project": o.tracking.wandb_project, "group": o.tracking.wandb_group}
        defaults = {"mode": mode, "project": PROJECT, "group": names["group"], "name": names["name"],
                    "tags": names["tags"], "dir": str(run.out), "id": None, "job_type": "train"}  # fmt: skip
        wandb_args = wandb_init_args(flags, defaults)
    return open_sinks(run.out, run.rank, wandb_args, {**names["config"], **run.describe()})


def train_to_end(run: Run) -> int:
    """Train and close; a numeric fault ends the run with a one-line error and exit status 3, bad data with 2, and
    ranks lost from the job (a node died or its link went down) with 4."""
    tracker = open_tracker(run)
    try:
        summary = fit(run, tracker)
    except (NumericFault, DataError) as e:
        tracker.summary({"fault": str(e)})
        tracker.close()
        # A numeric fault is the same on every rank (its values are all-reduced); bad data is this rank's own.
        if run.rank == 0 or isinstance(e, DataError):
            print(f"error: {e}", file=sys.stderr, flush=True)
        distributed.close()
        return 3 if isinstance(e, NumericFault) else 2
    except RuntimeError as e:
        if distributed.lost_peer(e) is None:
            raise
        lost_ranks(run, tracker)
        return 4
    finish(run, tracker, summary)
    return 0


def fit(run: Run, tracker: Sinks) -> dict:
    """The epoch loop: train, validate, record, checkpoint; returns the summary line."""
    o, eng, rows, began = run.opts, run.engine, [], time.perf_counter()
    for epoch in range(run.start["epoch"], o.optim.epochs):
        skip = run.start["step_in_epoch"] if epoch == run.start["epoch"] else 0
        if run.cuda:
            torch.cuda.reset_peak_memory_stats()
        meter, stop = train_epoch(run, epoch, skip, tracker)
        last = stop or epoch + 1 == o.optim.epochs
        top1, top5 = evaluate(run) if last or (epoch + 1) % o.tracking.eval_every == 0 else (None, None)
        if top1 is not None and (run.start["best_top1"] is None or top1 > run.start["best_top1"]):
            run.start.update(best_top1=top1, best_epoch=epoch)
        rows.append(epoch_row(run, epoch, meter, top1, top5))
        tracker.epoch(rows[-1], eng.global_steps)
        if rows[-1]["data_wait_share"] > INPUT_BOUND_SHARE:
            tracker.note(input_bound_line(run, rows[-1]))
        run.start["train_seconds"] += time.perf_counter() - began
        began = time.perf_counter()
        if last or (epoch + 1) % o.checkpoint.save_every_epochs == 0:
            save(run, epoch)
        if stop:
            break
    best = {k: run.start[k] for k in ("best_top1", "best_epoch")}
    speed = sum(r["images_per_sec"] for r in rows) / len(rows) if rows else None
    return dict(summary=True, **best, last_top1=rows[-1]["val_top1"] if rows else None, steps=eng.global_steps,
                skipped_steps=run.scale.skipped, images_per_sec=speed,
                train_wall_s=round(run.start["train_seconds"], 1))  # fmt: skip


def train_epoch(run: Run, epoch: int, skip: int, tracker: Sinks) -> tuple[StepMeter, bool]:
    """One epoch of training from optimizer step `skip` on; returns its meter and whether --max-steps was reached."""
    eng, o = run.engine, run.opts
    batches = run.data.train_epoch(epoch)
    # Resuming mid-epoch: an epoch's batches are the same in every session, so those already trained on are dropped.
    for _ in range(skip * run.accum):
        next(batches)
    meter = StepMeter(run.world * run.micro, run.schedule.steps_per_epoch, eng.device)
    last = min(o.optim.epochs * run.schedule.steps_per_epoch, o.optim.max_steps or math.inf)
    tracker.progress(run.schedule.steps_per_epoch, epoch, initial=skip, run_total=last)
    eng.train()
    for images, labels in meter.timed(batches):
        if not train_step(eng, run.scale, run.criterion, images, labels, meter):
            continue
        saving = o.checkpoint.save_every_steps and eng.global_steps % o.checkpoint.save_every_steps == 0
        if saving or eng.global_steps % o.tracking.log_every == 0:
            report(run, meter, tracker)  # sync point: every --log-every steps and before a checkpoint
        if saving:
            save(run, epoch)
        if o.optim.max_steps and eng.global_steps >= o.optim.max_steps:
            break
    report(run, meter, tracker)  # sync point: the epoch's last steps
    return meter, bool(o.optim.max_steps and eng.global_steps >= o.optim.max_steps)


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


def report(run: Run, meter: StepMeter, tracker: Sinks) -> None:
    """Read the steps since the last report (a sync point), log them, then stop on a numeric fault among them."""
    rows = meter.flush()
    run.scale.resolve(rows)
    tracker.steps(rows)
    run.guard.rows(rows)


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
    state = {**run.start, "epoch": position[0], "step_in_epoch": position[1], "schedule": run.schedule.as_dict(),
             "run": dataclasses.asdict(run.opts), "loss_scale": run.scale.state_dict(),
             "model": model_card(run)}  # fmt: skip
    checkpoint.save(run.engine, run.out / "checkpoints", state, run.opts.checkpoint.keep_checkpoints)


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
    run.start.update({k: state.get(k, run.start[k]) for k in run.start})
    run.scale.load_state_dict(state.get("loss_scale", {}))
    # The checkpoint brought back its loss-scale window; the flag of this session wins.
    engine.set_growth_interval(run.engine, run.opts.optim.loss_scale_window)
    run.guard.skipped = run.scale.skipped
    # A checkpoint of another memory layout (or DeepSpeed's loading) can leave momentum laid out unlike its weight.
    engine.match_state_layout(run.engine.optimizer)
    schedule.follow(run.engine)


# Share of an epoch's time the loop may wait for batches before the run says the input pipeline limits it.
INPUT_BOUND_SHARE = 0.05


def epoch_row(run: Run, epoch: int, meter: StepMeter, top1: float | None, top5: float | None) -> dict:
    """The epoch's line of metrics.jsonl: losses, accuracy and waits averaged over ranks (a sync point)."""
    seconds = meter.elapsed()
    loss_sum, micro, waited = distributed.all_sum([meter.loss_sum.item(), meter.micro_steps, meter.waited],
                                                  run.engine.device)  # fmt: skip
    # Host-side peak of this rank's allocations this epoch (no device sync); None on a CPU.
    peak, lr = torch.cuda.max_memory_allocated() if run.cuda else None, engine.lr(run.engine)
    return dict(epoch=epoch, train_loss=loss_sum / max(micro, 1), val_top1=top1, val_top5=top5, lr=lr,
                images_per_sec=meter.micro_steps * run.world * run.micro / seconds,
                data_wait_share=waited / run.world / seconds, peak_gpu_memory_bytes=peak,
                skipped_steps=run.scale.skipped, step=run.engine.global_steps)  # fmt: skip


def input_bound_line(run: Run, row: dict) -> str:
    """One line: the loop waited for batches this share of the epoch, and the knob to try first."""
    data, share = run.data, row["data_wait_share"]
    if not data.gpu and run.cuda:
        knob = "decode on the GPU (--data-device gpu)"
    elif data.gpu:
        knob = (f"raise --data-threads (now {data.threads}), --hw-decoder-load or --data-prefetch "
                f"(now {data.config.prefetch})")  # fmt: skip
    else:
        knob = f"raise --data-threads (now {data.threads}) or decode on a GPU"
    return (
        f"note: epoch {row['epoch']}: the input pipeline limits throughput: the training loop waited for "
        f"batches {100 * share:.0f}% of the epoch's time; {knob}"
    )


def finish(run: Run, tracker: Sinks, summary: dict) -> None:
    """Write the summary, close wandb and the process group, and say where everything is."""
    run.roll.stop()
    tracker.summary(summary)
    tracker.close()
    tracker.note(done_line(summary, run.out, tracker.wandb_dir))
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


def lost_ranks(run: Run, tracker: Sinks) -> None:
    """A collective failed because ranks went away: one line per node (its first rank) naming the ranks and nodes
    lost (the roll call), then every survivor leaves together. No close: the group is broken."""
    last = checkpoint.complete(run.out / "checkpoints")
    what = run.roll.lost()
    line = (f"error: rank {run.rank} of {run.world} on {distributed.where()}: a collective failed at step "
            f"{run.engine.global_steps}: lost {what}; the job is over: when every node is back, rerun with "
            f"--resume auto (last complete checkpoint: {last[-1].name if last else 'none'})")  # fmt: skip
    tracker.summary({"fault": line})
    tracker.close()
    first_on_node = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if first_on_node:
        print(line, file=sys.stderr, flush=True)
    wait = run.opts.cluster.dist_timeout + 10
    if run.roll.store is None and not first_on_node:
        # No store to wait on: leave the line to this node's first rank (the launcher ends this one when it exits).
        time.sleep(wait)
    run.roll.leave(wait)
    run.roll.stop()


def model_card(run: Run) -> dict:
    """What a checkpoint's weights need to be used without this run: the model, its classes and its input (saved
    with every checkpoint, in complete.json too; pipeline.evaluate and pipeline.export read it)."""
    o = run.opts
    return {"arch": o.optim.arch, "num_classes": run.data.num_classes, "classes": list(run.data.shards.class_names),
            "crop_size": o.data.crop_size, "val_resize": o.data.val_resize}  # fmt: skip


def wandb_names(run: Run) -> dict:
    """The run's name, group and tags in wandb, so a project dashboard compares runs by arch, global batch,
    precision and rank count as they come in, and the flat config keys to filter on."""
    o, batch = run.opts, run.ds["train_batch_size"]
    device = "GPU" if run.cuda else "CPU"
    flat = {"arch": o.optim.arch, "global_batch": batch, "micro_batch": run.micro, "grad_accum": run.accum,
            "world_size": run.world, "precision": run.precision, "device": device, "peak_lr": run.schedule.peak_lr,
            "epochs": o.optim.epochs, "warmup_epochs": o.optim.warmup_epochs, "schedule_kind": run.schedule.kind,
            "optimizer": o.optim.optimizer, "label_smoothing": o.optim.label_smoothing, "crop_size": o.data.crop_size,
            "channels_last": run.channels_last, "compile": o.optim.compile}  # fmt: skip
    return {
        "name": f"{o.optim.arch} B={batch} {run.precision} {run.world}x{device}",
        "group": f"{o.optim.arch} B={batch}",
        "tags": [o.optim.arch, f"B={batch}", run.precision, f"{run.world}x{device}"],
        "config": flat,
    }


if __name__ == "__main__":
    sys.exit(main())
