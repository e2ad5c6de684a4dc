"""Numeric faults that must stop a run, caught from the values each flush reads.

fp16 runs skip steps whose gradients overflow and lower the loss scale; that is normal, a long run
of it is not. bf16 and fp32 have no loss scale to fall back on, so a non-finite loss stops them.
The checks run before every checkpoint, so a checkpoint never holds weights from after a fault.
"""

from __future__ import annotations

import math

from pipeline.scaling import LOSS_SCALED


class NumericFault(RuntimeError):
    """The run cannot go on: overflow after overflow, or a non-finite loss; the message names the step."""


class Guard:
    """Watches the optimizer steps of a run for numeric faults, from the rows of each flush (host values); a
    checkpoint component, so a resumed run goes on counting."""

    def __init__(self, precision: str, max_skipped_steps: int, min_loss_scale: float):
        self.precision, self.max_skipped, self.min_scale = precision, max_skipped_steps, min_loss_scale
        # Loss-scaled precisions skip overflowing steps instead of stopping on a non-finite loss.
        self.scaled = precision in LOSS_SCALED
        # The skipped-step count so far (restored by a resume): a rise means this step was skipped.
        self.consecutive, self.skipped = 0, 0
        self.last_finite: tuple[int, float] | None = None

    def state_dict(self) -> dict:
        """A checkpoint component: the skips so far and in a row, and the last finite loss."""
        return {"skipped": self.skipped, "consecutive": self.consecutive, "last_finite": self.last_finite}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.consecutive = state["skipped"], state["consecutive"]
        self.last_finite = tuple(state["last_finite"]) if state["last_finite"] else None

    def _last(self) -> str:
        """The last finite loss seen, for the message."""
        return (
            f"last finite loss {self.last_finite[1]:.4g} at step {self.last_finite[0]}"
            if self.last_finite
            else ("no finite loss seen yet")
        )

    def check(self, rows: list[dict]) -> None:
        """After a flush: raise NumericFault on a non-finite loss (bf16, fp32), on `max_skipped_steps` overflow
        skips in a row, or on an fp16 overflow with the loss scale at its minimum."""
        for row in rows:
            step, scale = row["step"], row["loss_scale"]
            skipped_now = row["skipped_steps"] > self.skipped
            self.skipped = row["skipped_steps"]
            self.consecutive = self.consecutive + 1 if skipped_now else 0
            if math.isfinite(row["loss"]):
                self.last_finite = (step, row["loss"])
            elif not self.scaled:
                raise NumericFault(
                    f"step {step}: the training loss is {row['loss']} in {self.precision}; {self._last()}; "
                    "checkpoints are from before it: lower the lr or check the data, then --resume auto"
                )
            if self.max_skipped and self.consecutive >= self.max_skipped:
                raise NumericFault(
                    f"step {step}: {self.consecutive} optimizer steps in a row skipped for overflow (loss scale "
                    f"{scale:g}); {self._last()}; lower the lr or check the data (--max-skipped-steps sets the limit)"
                )
            if skipped_now and self.scaled and scale <= self.min_scale:
                raise NumericFault(
                    f"step {step}: fp16 overflow with the loss scale at its minimum {scale:g}; {self._last()}; "
                    "lower the lr, check the data, or train in bf16 (ds_configs/bs8k-bf16.json)"
                )
