"""The learning-rate schedule: a pure function of the optimizer step, derived from the batch and the data.

Two schedules share Goyal's gradual warmup (from 0.1 up to 0.1*B/256 in equal increments per
optimizer step):
- `warmup_decay` (default): DeepSpeed's `WarmupDecayLR`, linear decay back to 0.1 at the last step.
- `goyal_steps`: the paper's x0.1 at epochs 30, 60 and 80 of 90, scaled to the run's epochs.

Trap: DeepSpeed steps its scheduler only on applied optimizer steps, so each fp16 overflow skip
would shift the whole schedule one step later. `follow` sets the scheduler from the engine's
global step (which counts skipped steps too) after every optimizer step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pipeline.scaling import Recipe, warmup_decay_params

SCHEDULES = ("warmup_decay", "goyal_steps")
# Goyal et al.: the learning rate drops x0.1 at these epochs of a 90-epoch run.
GOYAL_EPOCHS, GOYAL_MILESTONES = 90, (30, 60, 80)


@dataclass(frozen=True)
class Schedule:
    """Every number of a run's learning-rate schedule, counted in optimizer steps."""

    kind: str
    # Warmup starts here (the reference lr); warmup_decay also ends here.
    base_lr: float
    # 0.1 * B / 256.
    peak_lr: float
    warmup_steps: int
    total_steps: int
    steps_per_epoch: int
    # goyal_steps: the steps at which the lr is multiplied by 0.1.
    milestones: tuple[int, ...] = ()

    def describe(self) -> str:
        """One line with the derived numbers, for the log."""
        if self.base_lr == self.peak_lr:
            warmup = f"lr {self.peak_lr:g} (B < 256: no warmup)"
        else:
            warmup = f"lr {self.base_lr:g} -> {self.peak_lr:g} over {self.warmup_steps} warmup steps"
        text = f"{self.kind}: {warmup}, {self.total_steps} steps ({self.steps_per_epoch} per epoch)"
        return text + (f", x0.1 at steps {', '.join(map(str, self.milestones))}" if self.milestones else "")

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
        warmup_steps=recipe.warmup_steps,
        total_steps=recipe.total_steps,
        steps_per_epoch=per_epoch,
        milestones=milestones,
    )


def lr_at(s: Schedule, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based, skipped steps included)."""
    if s.kind == "warmup_decay":
        # DeepSpeed's WarmupDecayLR formula at iteration `step`; it warms up over at least 2 steps.
        warmup = max(2, s.warmup_steps)
        if step < warmup:
            gamma = step / warmup
        else:
            gamma = max(0.0, (s.total_steps - step) / max(1.0, s.total_steps - warmup))
        return s.base_lr + (s.peak_lr - s.base_lr) * gamma
    if step < s.warmup_steps:
        return s.base_lr + (s.peak_lr - s.base_lr) * step / s.warmup_steps
    return s.peak_lr * 0.1 ** sum(step >= m for m in s.milestones)


def deepspeed_params(s: Schedule) -> dict:
    """The `scheduler.params` of a DeepSpeed WarmupDecayLR that follows `s` (warmup_decay only)."""
    return warmup_decay_params(s.base_lr, s.peak_lr, s.warmup_steps, s.total_steps)


class StepLR:
    """A DeepSpeed-compatible scheduler that sets `lr_at(schedule, iteration)` on every parameter group."""

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
