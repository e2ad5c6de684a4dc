"""The learning-rate schedule of a run: a pure function of the optimizer step, fitted to the batch and the data.

Two kinds (`--schedule`):
- `deepspeed` (default): the DeepSpeed configuration's `"scheduler"` section, built by DeepSpeed. The committed
  configurations hold the design's `WarmupDecayLR` from the linear scaling rule (pipeline/scaling.py): lr 0 ->
  0.1*B/256 in equal steps over 5 epochs, then linearly to 0 at the last step. `WarmupLR`, `WarmupCosineLR` and
  `OneCycle` are built the same way. Their step counts are fitted to the run's data and epochs (`fit`).
- `goyal_steps`: the paper's exact schedule, which DeepSpeed has no scheduler for: warmup from the reference lr
  0.1 (none at or below B = 256), then x0.1 at epochs 30, 60 and 80 of 90, scaled to the run's epochs.

The lr of optimizer step n is the scheduler's value at iteration n (DeepSpeed's formula: WarmupDecayLR gives
warmup_max_lr * n / warmup_num_steps while warming up, then warmup_max_lr * (total - n) / (total - warmup)).

Trap: DeepSpeed steps its scheduler only on applied optimizer steps, so each fp16 overflow skip would shift the
whole schedule one step later (and its own first two steps share iteration 0's lr). `follow` sets the scheduler
from the engine's global step (which counts skipped steps too) when the engine is built, after every optimizer
step and after a resume.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.options import at_least
from pipeline.scaling import (
    IMAGENET_TRAIN_IMAGES,
    RECIPE_EPOCHS,
    REFERENCE_BATCH,
    REFERENCE_LR,
    WARMUP_EPOCHS,
    Recipe,
    warmup_decay_section,
)

GOYAL = "goyal_steps"
# DeepSpeed's schedulers a run accepts in its configuration, and the parameters of each that count optimizer steps
# (what fitting scales). LRRangeTest is a tuning sweep, not a training schedule; torch's schedulers step by epoch.
STEP_COUNTS = {
    "WarmupDecayLR": ("warmup_num_steps", "total_num_steps"),
    "WarmupLR": ("warmup_num_steps",),
    "WarmupCosineLR": ("warmup_num_steps", "total_num_steps"),
    "OneCycle": ("cycle_first_step_size", "cycle_second_step_size", "decay_step_size"),
}
# DeepSpeed warms up over at least 2 steps (it raises fewer to 2, and refuses 0).
LEAST_WARMUP = 2
# Goyal et al.: the learning rate drops x0.1 at these epochs of a 90-epoch run.
GOYAL_MILESTONES = (30, 60, 80)


@dataclass(frozen=True)
class Schedule:
    """A run's learning-rate schedule: the scheduler's type and parameters as it is built with them, and the run's
    optimizer steps."""

    # A DeepSpeed scheduler type (STEP_COUNTS) or goyal_steps.
    kind: str
    # The scheduler's parameters (DeepSpeed's names), fitted to the run. goyal_steps: base_lr, peak_lr,
    # warmup_steps, milestones.
    params: dict
    # The run's optimizer steps, and those of one epoch.
    total_steps: int
    steps_per_epoch: int
    # The optimizer's own lr: the peak of WarmupCosineLR, and of WarmupLR without warmup_max_lr.
    optimizer_lr: float = 0.0
    # A scheduler of this kind over a one-parameter optimizer, built on first use: what lr_at reads (not compared).
    _probe: object = field(default=None, compare=False, repr=False)

    @property
    def deepspeed(self) -> bool:
        """Whether DeepSpeed builds this scheduler from the configuration."""
        return self.kind != GOYAL

    @property
    def warmup_steps(self) -> int:
        """Steps of warmup (0 where the schedule has none)."""
        return int(self.params.get("warmup_num_steps", self.params.get("warmup_steps", 0)) or 0)

    @property
    def milestones(self) -> tuple[int, ...]:
        """goyal_steps: the steps at which the lr drops x0.1."""
        return tuple(self.params.get("milestones", ()))

    @property
    def peak_lr(self) -> float:
        """The highest lr of the run (at a corner of the schedule or between its plotted steps)."""
        return max(lr_at(self, step) for step in _plot_steps(self))

    @property
    def end_lr(self) -> float:
        """The lr after the last step (0 for the committed WarmupDecayLR)."""
        return lr_at(self, self.total_steps)

    def describe(self) -> str:
        """One line with the scheduler and its numbers, for the log."""
        if self.deepspeed:
            values = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.params.items())
            text = f"{self.kind} (DeepSpeed): {values}"
        else:
            p = self.params
            if self.warmup_steps:
                text = f"lr {p['base_lr']:g} -> {p['peak_lr']:g} over {self.warmup_steps} warmup steps"
            else:
                text = f"lr {p['peak_lr']:g} from the first step (no warmup: the batch is at or below the reference)"
            text = f"{self.kind}: {text}, x0.1 at steps {', '.join(map(str, self.milestones))}"
        ends = f"peak {self.peak_lr:g}, end {self.end_lr:g}"
        return f"{text}; {ends}; {self.total_steps} steps ({self.steps_per_epoch} per epoch)"

    def as_dict(self) -> dict:
        """The schedule, for the run config, wandb and the checkpoint (a resume must derive the same)."""
        return {
            "kind": self.kind,
            "params": dict(self.params),
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "optimizer_lr": self.optimizer_lr,
        }


def lr_at(s: Schedule, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based, skipped steps included), as the run's scheduler sets it:
    DeepSpeed's own class for its types, so the log and lr.png show what the engine applies."""
    if s._probe is None:
        import torch

        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=s.optimizer_lr)
        object.__setattr__(s, "_probe", scheduler_over(optimizer, s))
    s._probe.step(step)
    return float(s._probe.get_last_lr()[0])


def scheduler_over(optimizer, s: Schedule):
    """A scheduler over `optimizer`: DeepSpeed's class for its types (as the engine builds it from the
    configuration), GoyalSteps otherwise; set to step 0."""
    if s.deepspeed:
        from deepspeed.runtime import lr_schedules

        # Built at iteration 0, not DeepSpeed's -1, whose lr it only reaches with a warning.
        scheduler = getattr(lr_schedules, s.kind)(optimizer, **s.params, last_batch_iteration=0)
    else:
        scheduler = GoyalSteps(optimizer, s)
    scheduler.step(0)
    return scheduler


# ---- fitting a run's schedule ----


@dataclass(frozen=True)
class RunSteps:
    """What a schedule is fitted to: the global batch, the training images and epochs of the run, the warmup asked
    for on the command line (None: the configuration's), and the linear scaling rule's anchor."""

    batch_size: int
    train_images: int
    epochs: int
    warmup_epochs: float | None
    reference_batch: int
    reference_lr: float

    @property
    def recipe(self) -> Recipe:
        """The rule's recipe for this run (warmup: the flag, or the recipe's 5 of 90 epochs scaled to the run)."""
        warmup = self.warmup_epochs if self.warmup_epochs is not None else default_warmup_epochs(self.epochs)
        return Recipe(
            self.batch_size,
            self.batch_size,
            epochs=self.epochs,
            warmup_epochs=warmup,
            train_images=self.train_images,
            reference_batch=self.reference_batch,
            reference_lr=self.reference_lr,
        )

    @property
    def generated_for(self) -> Recipe:
        """The recipe the committed configurations count their steps in: ImageNet-1k, 90 epochs, this batch."""
        return Recipe(self.batch_size, self.batch_size)


def default_warmup_epochs(epochs: int) -> float:
    """goyal_steps' warmup for a run of `epochs`: 5 epochs at 90 or more, the same share of a shorter run."""
    return WARMUP_EPOCHS * min(1.0, epochs / RECIPE_EPOCHS)


def fit(kind: str, ds: dict, path: str, run: RunSteps) -> tuple[Schedule, dict, list[str]]:
    """The run's schedule of --schedule `kind`, the configuration as DeepSpeed is to build it (its "scheduler"
    fitted, or removed; the optimizer's lr) and one line per change. ValueError (one line) for what cannot be
    fitted."""
    check_kind(kind)
    ds = {**ds, "optimizer": {**ds.get("optimizer", {}), "params": dict(ds.get("optimizer", {}).get("params", {}))}}
    sgd = ds["optimizer"]["params"]
    if sgd.get("lr", run.generated_for.peak_lr) == run.generated_for.peak_lr:
        # The rule's value (or none): the rule's, with this run's anchor (--reference-batch/--reference-lr).
        sgd["lr"] = run.recipe.peak_lr
    return KINDS[kind](ds, path, run)


def check_kind(kind: str) -> None:
    """Refuse a --schedule that is not in the registry (ValueError, one line)."""
    if kind not in KINDS:
        raise ValueError(f"--schedule {kind}: use one of {', '.join(KINDS)}")


def from_configuration(ds: dict, path: str, run: RunSteps) -> tuple[Schedule, dict, list[str]]:
    """--schedule deepspeed: the configuration's scheduler (the rule's WarmupDecayLR where it has none), its step
    counts fitted to the run (_fit_counts), built by DeepSpeed."""
    notes, section = [], ds.get("scheduler")
    if section is None:
        section = warmup_decay_section(run.generated_for)
        notes.append(f"{path}: no scheduler; using the linear scaling rule's WarmupDecayLR (as ds_configs/ hold)")
    kind = section.get("type")
    if kind not in STEP_COUNTS:
        raise ValueError(
            f"{path}: scheduler type {kind!r}: use one of {', '.join(STEP_COUNTS)} (DeepSpeed's), or --schedule "
            "goyal_steps"
        )
    defaults, given = _defaults(kind), section.get("params", {})
    params = {**defaults, **given}
    if "warmup_type" in defaults and "warmup_type" not in given:
        notes.append(f"{path}: {kind} without warmup_type warms up logarithmically (DeepSpeed's default), not linearly")
    if params.get("warmup_max_lr") == run.generated_for.peak_lr:
        params["warmup_max_lr"] = run.recipe.peak_lr
    params, changes = _fit_counts(kind, params, run)
    if changes:
        notes.append(
            f"{path}: {kind} fitted to this run ({run.train_images:,} training images, {run.epochs} epochs: "
            f"{run.recipe.total_steps} steps; the file counts {run.generated_for.total_steps}: "
            f"{RECIPE_EPOCHS} epochs of ImageNet's {IMAGENET_TRAIN_IMAGES:,} at B={run.batch_size}): "
            + ", ".join(changes)
        )
    ds["scheduler"] = {"type": kind, "params": params}
    lr = ds["optimizer"]["params"]["lr"]
    return Schedule(kind, params, run.recipe.total_steps, run.recipe.steps_per_epoch, optimizer_lr=lr), ds, notes


def paper_steps(ds: dict, path: str, run: RunSteps) -> tuple[Schedule, dict, list[str]]:
    """--schedule goyal_steps: the paper's schedule (goyal_steps), our GoyalSteps scheduler in place of the
    configuration's."""
    section, notes = ds.pop("scheduler", None), []
    if section is not None:
        notes.append(f"{path}: its scheduler ({section.get('type')}) is not used: --schedule goyal_steps")
    return goyal_steps(run.recipe, ds["optimizer"]["params"]["lr"]), ds, notes


def _defaults(kind: str) -> dict:
    """A DeepSpeed scheduler's parameters with defaults (those without are required)."""
    from deepspeed.runtime import lr_schedules

    signature = inspect.signature(getattr(lr_schedules, kind))
    return {
        name: p.default
        for name, p in signature.parameters.items()
        if name not in ("optimizer", "last_batch_iteration") and p.default is not inspect.Parameter.empty
    }


def _fit_counts(kind: str, params: dict, run: RunSteps) -> tuple[dict, list[str]]:
    """The scheduler's step counts laid over the run: each a share of the run it was counted in (ImageNet-1k, 90
    epochs, this batch), so on that run they are taken as written; --warmup-epochs sets the warmup itself."""
    total, generated = run.recipe.total_steps, run.generated_for.total_steps
    fitted, changes = dict(params), []
    for name in STEP_COUNTS[kind]:
        count = params.get(name)
        if name == "total_num_steps" and count is None:
            fitted[name] = total
        elif count and total != generated:
            fitted[name] = max(1, round(count * total / generated))
    if run.warmup_epochs is not None:
        if "warmup_num_steps" not in params:
            raise ValueError(f"--warmup-epochs {run.warmup_epochs:g}: {kind} has no warmup; leave the flag out")
        fitted["warmup_num_steps"] = run.recipe.warmup_steps
    if "warmup_num_steps" in fitted and fitted["warmup_num_steps"] < LEAST_WARMUP:
        fitted["warmup_num_steps"] = LEAST_WARMUP
    end = fitted.get("total_num_steps", total)
    if fitted.get("warmup_num_steps", 0) >= min(end, total):
        raise ValueError(
            f"{kind}: warmup_num_steps {fitted['warmup_num_steps']} is the whole run ({min(end, total)} steps); "
            "lower --warmup-epochs (or the configuration's warmup_num_steps), or raise --epochs"
        )
    for name in STEP_COUNTS[kind]:
        if fitted.get(name) != params.get(name):
            changes.append(f"{name} {params.get(name)} -> {fitted[name]}")
    return fitted, changes


def goyal_steps(recipe: Recipe, optimizer_lr: float) -> Schedule:
    """The paper's schedule for a recipe: warmup from the reference lr, x0.1 at epochs 30/60/80 of 90 (scaled)."""
    if recipe.base_lr < recipe.peak_lr and recipe.warmup_steps >= recipe.total_steps:
        raise ValueError(
            f"--warmup-epochs {recipe.warmup_epochs:g}: {recipe.warmup_steps} warmup steps are the whole run "
            f"({recipe.total_steps} steps); lower it or raise --epochs"
        )
    per_epoch = recipe.steps_per_epoch
    params = {
        "base_lr": recipe.base_lr,
        "peak_lr": recipe.peak_lr,
        # A batch at or below the reference starts at its peak: there is nothing to warm up.
        "warmup_steps": recipe.warmup_steps if recipe.base_lr < recipe.peak_lr else 0,
        "milestones": tuple(round(m * recipe.epochs / RECIPE_EPOCHS) * per_epoch for m in GOYAL_MILESTONES),
    }
    return Schedule(GOYAL, params, recipe.total_steps, per_epoch, optimizer_lr=optimizer_lr)


# `--schedule`: one function each, fitting it to a run (the configuration's scheduler, built by DeepSpeed; or the
# paper's steps, ours).
KINDS = {"deepspeed": from_configuration, GOYAL: paper_steps}


def goyal_lr(params: dict, step: int) -> float:
    """goyal_steps' lr of `step`: linear warmup from base_lr to peak_lr, then x0.1 at every milestone passed."""
    base, peak, warmup = params["base_lr"], params["peak_lr"], params["warmup_steps"]
    if step < warmup:
        return base + (peak - base) * step / warmup
    return peak * 0.1 ** sum(step >= m for m in params["milestones"])


class GoyalSteps:
    """goyal_steps' scheduler, handed to deepspeed.initialize (DeepSpeed has none like it): sets the lr of
    iteration `last_batch_iteration` on every parameter group; steps like DeepSpeed's schedulers."""

    def __init__(self, optimizer, schedule: Schedule):
        self.optimizer, self.params = getattr(optimizer, "optimizer", optimizer), schedule.params
        self.last_batch_iteration = 0
        self.step(0)

    def step(self, last_batch_iteration: int | None = None) -> None:
        """Move to `last_batch_iteration` (default: the next one) and set its learning rate."""
        if last_batch_iteration is None:
            last_batch_iteration = self.last_batch_iteration + 1
        self.last_batch_iteration = last_batch_iteration
        for group in self.optimizer.param_groups:
            group["lr"] = goyal_lr(self.params, last_batch_iteration)

    def get_last_lr(self) -> list[float]:
        """The learning rate of each parameter group."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: dict) -> None:
        self.step(state["last_batch_iteration"])


def follow(engine) -> None:
    """Set the lr of the next optimizer step from the engine's global step, skipped steps included."""
    engine.lr_scheduler.step(engine.global_steps)


class Followed:
    """The run's schedule as a checkpoint component: saved as its numbers; on a resume, a checkpoint of another
    schedule is refused, and the lr of the next step is set from the restored global step (DeepSpeed's scheduler
    restores only its step counter, not the lr)."""

    def __init__(self, engine, schedule: Schedule):
        self.engine, self.schedule = engine, schedule

    def state_dict(self) -> dict:
        return self.schedule.as_dict()

    def load_state_dict(self, state: dict) -> None:
        if state != self.schedule.as_dict():
            raise ValueError(
                f"it was trained on schedule {state}, this run derives {self.schedule.as_dict()}; resume with its "
                "--epochs, --schedule and DeepSpeed config, or a new --out-dir"
            )
        follow(self.engine)


# ---- lr.png ----


def plot(s: Schedule, path: Path, size: tuple[int, int] = (400, 220)) -> None:
    """A small PNG of the whole schedule: lr against optimizer steps, the warmup's end and every milestone marked,
    titled with the peak and end lr (drawn with Pillow: a run pays milliseconds for it, not a plotting library)."""
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 46, width - 12, 24, height - 30
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    steps, peak = _plot_steps(s), s.peak_lr or 1.0
    x = lambda step: left + (right - left) * step / max(1, s.total_steps)  # noqa: E731
    y = lambda lr: bottom - (bottom - top) * lr / peak  # noqa: E731
    for step in (s.warmup_steps, *s.milestones):
        draw.line([(x(step), top), (x(step), bottom)], fill=(220, 220, 220))
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    draw.line([(x(step), y(lr_at(s, step))) for step in steps], fill=(31, 119, 180), width=2)
    draw.text((left, 5), f"{s.kind}: peak {s.peak_lr:g}, end {s.end_lr:g}", fill="black")
    draw.text((4, top - 6), f"{peak:g}", fill="black")
    draw.text((4, bottom - 6), "0", fill="black")
    draw.text((left, bottom + 4), "step 0", fill="black")
    end = f"{s.total_steps} ({s.total_steps // s.steps_per_epoch} epochs)"
    draw.text((right - 6 * len(end), bottom + 4), end, fill="black")
    image.save(path)


def _plot_steps(s: Schedule, points: int = 2000) -> list[int]:
    """Steps enough to draw the schedule exactly: an even spread, and both sides of every corner."""
    counts = [s.params.get(name) or 0 for name in STEP_COUNTS.get(s.kind, ())]
    corners = {0, s.warmup_steps, s.total_steps, *counts, *s.milestones, *(m - 1 for m in s.milestones)}
    spread = range(0, s.total_steps + 1, max(1, s.total_steps // points))
    return sorted({*spread, *(c for c in corners if 0 <= c <= s.total_steps)})


@dataclass(frozen=True)
class ScheduleOptions:
    """How long the run trains and its learning-rate schedule (the kinds: KINDS)."""

    # Epochs to train; the schedule is laid out over exactly this many.
    epochs: int = 90
    # deepspeed: the DeepSpeed configuration's scheduler, built by DeepSpeed, its step counts fitted to the data and
    # --epochs (ds_configs/: WarmupDecayLR, linear warmup from 0, then linearly to 0 at the end); goyal_steps: the
    # paper's (warmup from 0.1, x0.1 at epochs 30/60/80 of 90, scaled to --epochs).
    schedule: str = "deepspeed"
    # Epochs of linear warmup (default: the configuration's warmup_num_steps, fitted to the run; goyal_steps: 5 of
    # 90 epochs, scaled to shorter --epochs, none at or below B=256).
    warmup_epochs: float | None = None
    # The linear scaling rule's anchor batch: lr = reference_lr * B / reference_batch (256 in the paper).
    reference_batch: int = REFERENCE_BATCH
    # The linear scaling rule's lr at the anchor batch (0.1 in the paper).
    reference_lr: float = REFERENCE_LR
    # Stop after this many optimizer steps in all (0: run every epoch); the schedule is unchanged.
    max_steps: int = 0

    def __post_init__(self):
        check_kind(self.schedule)
        if self.epochs < 1:
            raise ValueError(f"--epochs {self.epochs}: must be at least 1")
        if self.warmup_epochs is not None and not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"--warmup-epochs {self.warmup_epochs}: must lie in [0, --epochs {self.epochs})")
        if self.reference_batch < 1 or self.reference_lr <= 0:
            raise ValueError(
                f"--reference-batch {self.reference_batch}, --reference-lr {self.reference_lr}: both must be positive"
            )
        at_least(self, ("max_steps",), 0)

    def steps(self, batch: int, train_images: int) -> RunSteps:
        """The run's step counts with global batch `batch` over `train_images` images."""
        return RunSteps(batch, train_images, self.epochs, self.warmup_epochs, self.reference_batch, self.reference_lr)
