"""Numeric faults that must stop a run, caught from values the loop already has on the host.

fp16 runs skip steps whose gradients overflow and lower the loss scale; that is normal, a long run
of it is not. bf16 and fp32 have no loss scale to fall back on, so a non-finite loss stops them.
The checks run before every checkpoint, so a checkpoint never holds weights from after a fault.
"""

from __future__ import annotations

import math


class NumericFault(RuntimeError):
    """The run cannot go on: overflow after overflow, or a non-finite loss; the message names the step."""


class Guard:
    """Watches the optimizer steps of a run for numeric faults."""

    def __init__(self, precision: str, max_skipped_steps: int, min_loss_scale: float, skipped_steps: int = 0):
        self.precision, self.max_skipped, self.min_scale = precision, max_skipped_steps, min_loss_scale
        # The engine's skipped-step count so far (restored by a resume): a rise means this step was skipped.
        self.consecutive, self.skipped, self.at = 0, skipped_steps, (0, 1.0)
        # Why the last step must stop the run: "in a row", "minimum" (fp16 loss scale) or None.
        self.reason: str | None = None
        self.last_finite: tuple[int, float] | None = None

    def _last(self) -> str:
        """The last finite loss seen, for the message."""
        return f"last finite loss {self.last_finite[1]:.4g} at step {self.last_finite[0]}" if self.last_finite else (
            "no finite loss seen yet")  # fmt: skip

    def step(self, step: int, skipped_steps: int, loss_scale: float) -> bool:
        """After an optimizer step, from host values (no sync): whether overflow skips must stop the run."""
        skipped_now = skipped_steps > self.skipped
        self.skipped = skipped_steps
        self.consecutive = self.consecutive + 1 if skipped_now else 0
        self.at = (step, loss_scale)
        at_minimum = skipped_now and self.precision == "fp16" and loss_scale <= self.min_scale
        in_a_row = bool(self.max_skipped and self.consecutive >= self.max_skipped)
        self.reason = "in a row" if in_a_row else "minimum" if at_minimum else None
        return self.reason is not None

    def stop(self) -> None:
        """Raise the fault `step` reported, naming the last finite loss (flush the pending rows first)."""
        step, scale = self.at
        if self.reason == "minimum":
            raise NumericFault(
                f"step {step}: fp16 overflow with the loss scale at its minimum {scale:g}; {self._last()}; "
                "lower the lr, check the data, or train in bf16 (ds_configs/bs8k-bf16.json)"
            )
        raise NumericFault(
            f"step {step}: {self.consecutive} optimizer steps in a row skipped for overflow (loss scale {scale:g}); "
            f"{self._last()}; lower the lr or check the data (--max-skipped-steps sets the limit)"
        )

    def rows(self, rows: list[dict]) -> None:
        """After a flush (losses are host floats there): stop on a non-finite loss in bf16 or fp32."""
        for row in rows:
            if math.isfinite(row["loss"]):
                self.last_finite = (row["step"], row["loss"])
            elif self.precision != "fp16":
                raise NumericFault(
                    f"step {row['step']}: the training loss is {row['loss']} in {self.precision}; {self._last()}; "
                    "checkpoints are from before it: lower the lr or check the data, then --resume auto"
                )
