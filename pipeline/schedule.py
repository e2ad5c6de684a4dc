"""The learning-rate schedule: a pure function of the optimizer step, derived from the batch and the data.

Two schedules share Goyal's gradual warmup (from the reference lr 0.1 up to 0.1*B/256 in equal increments per
optimizer step; a batch at or below the reference starts at its peak):
- `warmup_decay` (default): then a linear decay that reaches 0 at the end of training (step `total_steps`).
- `goyal_steps`: the paper's x0.1 at epochs 30, 60 and 80 of 90, scaled to the run's epochs.

Why not DeepSpeed's `WarmupDecayLR`: its decay ends at `warmup_min_lr`, the value its warmup starts from, so it
cannot warm up from 0.1 and decay to 0; with 0.1 as the minimum the last step of a B=8192 run still trains at 0.1
(30x Goyal's final 0.0032), and a batch of 256 or less, whose warmup starts at its peak, never decays at all.
`LRSchedule` is handed to `deepspeed.initialize` instead, for both kinds.

Trap: DeepSpeed steps its scheduler only on applied optimizer steps, so each fp16 overflow skip would shift the
whole schedule one step later. `follow` sets the scheduler from the engine's global step (which counts skipped
steps too) after every optimizer step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.scaling import Recipe

SCHEDULES = ("warmup_decay", "goyal_steps")
# Goyal et al.: the learning rate drops x0.1 at these epochs of a 90-epoch run.
GOYAL_EPOCHS, GOYAL_MILESTONES = 90, (30, 60, 80)


@dataclass(frozen=True)
class Schedule:
    """Every number of a run's learning-rate schedule, counted in optimizer steps."""

    kind: str
    # Warmup starts here (the reference lr, or the peak for a batch at or below the reference).
    base_lr: float
    # 0.1 * B / 256.
    peak_lr: float
    # Steps of linear warmup (0 when base_lr is the peak: nothing to warm up).
    warmup_steps: int
    # The end of training: warmup_decay reaches lr 0 here.
    total_steps: int
    steps_per_epoch: int
    # goyal_steps: the steps at which the lr is multiplied by 0.1.
    milestones: tuple[int, ...] = ()

    def describe(self) -> str:
        """One line with the derived numbers, for the log."""
        if self.warmup_steps:
            text = f"lr {self.base_lr:g} -> {self.peak_lr:g} over {self.warmup_steps} warmup steps"
        else:
            text = f"lr {self.peak_lr:g} from the first step (no warmup: the batch is at or below the reference)"
        if self.kind == "warmup_decay":
            text += f", then linearly to 0 at step {self.total_steps}"
        else:
            text += f", x0.1 at steps {', '.join(map(str, self.milestones))}"
        ends = f"peak {self.peak_lr:g}, end {self.end_lr:g}"
        return f"{self.kind}: {text}; {ends}; {self.total_steps} steps ({self.steps_per_epoch} per epoch)"

    @property
    def end_lr(self) -> float:
        """The lr the schedule ends at, after its last step (0 for warmup_decay)."""
        return lr_at(self, self.total_steps)

    def as_dict(self) -> dict:
        """The numbers, for the run config and wandb."""
        return asdict(self)


def derive(kind: str, recipe: Recipe) -> Schedule:
    """The schedule of a run from its recipe: global batch, real training-set size, epochs and warmup."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule {kind!r}: use one of {', '.join(SCHEDULES)}")
    per_epoch = recipe.steps_per_epoch
    milestones = ()
    if kind == "goyal_steps":
        milestones = tuple(round(m * recipe.epochs / GOYAL_EPOCHS) * per_epoch for m in GOYAL_MILESTONES)
    return Schedule(
        kind=kind,
        base_lr=recipe.base_lr,
        peak_lr=recipe.peak_lr,
        # A batch at or below the reference starts at its peak: there is nothing to warm up.
        warmup_steps=recipe.warmup_steps if recipe.base_lr < recipe.peak_lr else 0,
        total_steps=recipe.total_steps,
        steps_per_epoch=per_epoch,
        milestones=milestones,
    )


def lr_at(s: Schedule, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based, skipped steps included)."""
    if step < s.warmup_steps:
        return s.base_lr + (s.peak_lr - s.base_lr) * step / s.warmup_steps
    if s.kind == "warmup_decay":
        return s.peak_lr * max(0.0, (s.total_steps - step) / (s.total_steps - s.warmup_steps))
    return s.peak_lr * 0.1 ** sum(step >= m for m in s.milestones)


def plot(s: Schedule, path: Path, size: tuple[int, int] = (400, 220)) -> None:
    """A small PNG of the whole schedule: lr against optimizer steps, the warmup's end and every milestone marked,
    titled with the peak and end lr (drawn with Pillow: a run pays milliseconds for it, not a plotting library)."""
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 46, width - 12, 24, height - 30
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    steps = _plot_steps(s)
    x = lambda step: left + (right - left) * step / max(1, s.total_steps)  # noqa: E731
    y = lambda lr: bottom - (bottom - top) * lr / s.peak_lr  # noqa: E731
    for step in (s.warmup_steps, *s.milestones):
        draw.line([(x(step), top), (x(step), bottom)], fill=(220, 220, 220))
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    draw.line([(x(step), y(lr_at(s, step))) for step in steps], fill=(31, 119, 180), width=2)
    draw.text((left, 5), f"{s.kind}: peak {s.peak_lr:g}, end {s.end_lr:g}", fill="black")
    draw.text((4, top - 6), f"{s.peak_lr:g}", fill="black")
    draw.text((4, bottom - 6), "0", fill="black")
    draw.text((left, bottom + 4), "step 0", fill="black")
    end = f"{s.total_steps} ({s.total_steps // s.steps_per_epoch} epochs)"
    draw.text((right - 6 * len(end), bottom + 4), end, fill="black")
    image.save(path)


def _plot_steps(s: Schedule, points: int = 2000) -> list[int]:
    """Steps enough to draw the schedule exactly: an even spread, and both sides of every corner."""
    corners = {0, s.warmup_steps, s.total_steps, *s.milestones, *(m - 1 for m in s.milestones)}
    spread = range(0, s.total_steps + 1, max(1, s.total_steps // points))
    return sorted({*spread, *(c for c in corners if 0 <= c <= s.total_steps)})


class LRSchedule:
    """The run's scheduler, handed to deepspeed.initialize: sets `lr_at(schedule, iteration)` on every parameter
    group (DeepSpeed calls `step()` after each applied optimizer step; `follow` corrects it for skipped ones)."""

    def __init__(self, optimizer, schedule: Schedule):
        self.optimizer, self.schedule = optimizer, schedule
        self.last_batch_iteration = 0
        self.step(0)

    def step(self, last_batch_iteration: int | None = None) -> None:
        """Move to `last_batch_iteration` (default: the next one) and set its learning rate."""
        if last_batch_iteration is None:
            last_batch_iteration = self.last_batch_iteration + 1
        self.last_batch_iteration = last_batch_iteration
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.schedule, last_batch_iteration)

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
