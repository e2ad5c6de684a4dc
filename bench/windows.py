"""How a measurement's optimizer steps become images/s: timed windows, closed the way train.py flushes its rows
(every --log-every steps, with one host-device sync, and at epoch ends), and which windows count as steady. The
one place the benchmark's timing lives: every measurement, train.py's own steps.jsonl included, goes through
steady_rates."""

from __future__ import annotations

import time
from collections import defaultdict

import torch


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
