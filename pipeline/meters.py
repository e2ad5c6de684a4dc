"""Loss, accuracy and throughput meters that keep values on the device until they are asked for."""

from __future__ import annotations

import time

import torch

from pipeline.data import IGNORE


def accuracy_counts(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[samples, top-1 hits, top-5 hits] of a batch, on its device; padding labels (IGNORE) are not counted."""
    real = labels != IGNORE
    k = min(5, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]) & real[:, None]
    return torch.stack([real.sum(), hits[:, 0].sum(), hits.any(dim=1).sum()]).double()


class StepMeter:
    """Training losses of one epoch: per optimizer step for logging, and their sum for the epoch mean."""

    def __init__(self, images_per_micro_step: int, device: torch.device):
        self.images_per_micro_step = images_per_micro_step
        self.pending: list[torch.Tensor] = []
        self.rows: list[dict] = []
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.micro_steps = 0
        self.start = self.window = time.perf_counter()

    def micro_step(self, loss: torch.Tensor) -> None:
        """Record one micro-batch loss (no sync)."""
        loss = loss.detach().float()
        self.pending.append(loss)
        self.loss_sum += loss
        self.micro_steps += 1

    def optimizer_step(self, step: int, lr: float, loss_scale: float, skipped: int) -> None:
        """Close an optimizer step: its loss is the mean over its micro-batches (still on the device)."""
        loss = torch.stack(self.pending).mean()
        self.rows.append(dict(step=step, loss=loss, lr=lr, loss_scale=loss_scale, skipped_steps=skipped,
                              micro=len(self.pending)))  # fmt: skip
        self.pending = []

    def flush(self) -> list[dict]:
        """The rows since the last flush, losses as floats, with the window's img/s. Note: a host-device sync point."""
        if not self.rows:
            return []
        losses = torch.stack([r["loss"] for r in self.rows]).tolist()
        now = time.perf_counter()
        images = sum(r.pop("micro") for r in self.rows) * self.images_per_micro_step
        speed = images / max(now - self.window, 1e-9)
        rows, self.rows, self.window = self.rows, [], now
        for row, loss in zip(rows, losses, strict=True):
            row.update(loss=loss, images_per_sec=speed)
        return rows

    def elapsed(self) -> float:
        """Seconds since the epoch's first step began."""
        return time.perf_counter() - self.start
