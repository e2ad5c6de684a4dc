"""Loss, accuracy and throughput meters that keep values on the device until they are asked for."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from pipeline.data import IGNORE


def accuracy_counts(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[samples, top-1 hits, top-5 hits] of a batch, on its device; padding labels (IGNORE) are not counted."""
    real = labels != IGNORE
    k = min(5, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]) & real[:, None]
    return torch.stack([real.sum(), hits[:, 0].sum(), hits.any(dim=1).sum()]).double()


class StepMeter:
    """Training loss and top-1 error of one epoch, per optimizer step over all ranks, kept on the device."""

    def __init__(self, images_per_micro_step: int, steps_per_epoch: int, device: torch.device):
        self.images_per_micro_step, self.steps_per_epoch = images_per_micro_step, steps_per_epoch
        # Per micro-batch: [loss, correct top-1, samples, 1] on the device.
        self.pending: list[torch.Tensor] = []
        self.rows: list[dict] = []
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.micro_steps = 0
        self.start = self.window = time.perf_counter()

    def micro_step(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Record one micro-batch (no sync)."""
        loss = loss.detach().float()
        correct = (logits.detach().argmax(dim=1) == labels).sum().float()
        self.pending.append(torch.stack([loss, correct, loss.new_tensor(labels.numel()), loss.new_tensor(1.0)]))
        self.loss_sum += loss
        self.micro_steps += 1

    def optimizer_step(self, step: int, lr: float, loss_scale: float, skipped: int) -> None:
        """Close an optimizer step: sum its micro-batches (still on the device)."""
        self.rows.append(dict(step=step, totals=torch.stack(self.pending).sum(0), lr=lr, loss_scale=loss_scale,
                              skipped_steps=skipped, micro=len(self.pending)))  # fmt: skip
        self.pending = []

    def flush(self) -> list[dict]:
        """The rows since the last flush, summed over ranks (a collective: every rank calls it at the same steps),
        with the window's img/s. Note: a host-device sync point."""
        if not self.rows:
            return []
        totals = torch.stack([r.pop("totals") for r in self.rows])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)
        now = time.perf_counter()
        micro = sum(r.pop("micro") for r in self.rows)
        speed = micro * self.images_per_micro_step / max(now - self.window, 1e-9)
        rows, self.rows, self.window = self.rows, [], now
        for row, (loss, correct, seen, micro_batches) in zip(rows, totals.tolist(), strict=True):
            row.update(epoch=row["step"] / self.steps_per_epoch, loss=loss / micro_batches,
                       error=100 * (1 - correct / seen), images_per_sec=speed)  # fmt: skip
        return rows

    def elapsed(self) -> float:
        """Seconds since the epoch's first step began."""
        return time.perf_counter() - self.start
