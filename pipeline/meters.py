"""Loss, accuracy and throughput meters that keep values on the device until they are asked for."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from pipeline import distributed
from pipeline.data.shards import IGNORE


def accuracy_counts(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[samples, top-1 hits, top-5 hits] of a batch, on its device; padding labels (IGNORE) are not counted."""
    real = labels != IGNORE
    k = min(5, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]) & real[:, None]
    return torch.stack([real.sum(), hits[:, 0].sum(), hits.any(dim=1).sum()]).double()


@torch.no_grad()
def validate(model, batches: Iterable, device: torch.device, flip: bool = False) -> tuple[float, float, int]:
    """Top-1 and top-5 accuracy (percent) of `model` over `batches`, and the images counted, summed exactly over
    all ranks (padding labels are not counted). `flip`: test-time augmentation, the logits of each image and of its
    mirror image summed (FFCV's). Note: a host-device sync point, once, at the end."""
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    for images, labels in batches:
        images = images.to(device)
        logits = model(images)
        if flip:
            logits = logits.float() + model(images.flip(3)).float()
        counts += accuracy_counts(logits, labels.to(device))
    seen, top1, top5 = distributed.all_sum(counts.tolist(), device)
    return 100 * top1 / seen, 100 * top5 / seen, int(seen)


class StepMeter:
    """Training loss and top-1 error of one epoch, per optimizer step over all ranks, kept on the device."""

    def __init__(self, images_per_micro_step: int, steps_per_epoch: int, device: torch.device):
        self.images_per_micro_step, self.steps_per_epoch, self.device = images_per_micro_step, steps_per_epoch, device
        # Per micro-batch of the open optimizer step: [loss, correct top-1] on the device; its samples on the host.
        self.pending: list[torch.Tensor] = []
        self.pending_samples = 0
        self.rows: list[dict] = []
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.micro_steps = 0
        self.start = self.window = self.last_step = time.perf_counter()
        # Host seconds spent waiting for batches: in the open optimizer step, and in the epoch.
        self.pending_wait, self.waited = 0.0, 0.0

    def timed(self, batches: Iterable) -> Iterator:
        """`batches`, recording the host time spent waiting for each (a clock read, no device sync)."""
        batches = iter(batches)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            self.pending_wait += time.perf_counter() - start
            if batch is None:
                return
            yield batch

    def micro_step(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Record one micro-batch (no sync: counts that are Python numbers stay on the host, as a tensor made from
        one would be a blocking copy to the device)."""
        loss = loss.detach().float()
        correct = (logits.detach().argmax(dim=1) == labels).sum().float()
        self.pending.append(torch.stack([loss, correct]))
        self.pending_samples += labels.numel()
        self.loss_sum += loss
        self.micro_steps += 1

    def optimizer_step(self, step: int, lr: float, loss_scale: float | torch.Tensor, skipped: int | None) -> None:
        """Close an optimizer step: sum its micro-batches (still on the device). `loss_scale` may be a device value,
        and `skipped` unknown (None) until it is read (loss_scale.LossScale.resolve)."""
        totals, now = torch.stack(self.pending).sum(0), time.perf_counter()
        # Host times: the wait for this step's batches, and the wall time since the last step closed.
        self.rows.append(
            dict(
                step=step,
                totals=totals,
                lr=lr,
                loss_scale=loss_scale,
                skipped_steps=skipped,
                micro=len(self.pending),
                samples=self.pending_samples,
                data_wait_s=self.pending_wait,
                step_s=now - self.last_step,
            )
        )
        self.waited += self.pending_wait
        self.pending, self.pending_samples, self.pending_wait, self.last_step = [], 0, 0.0, now

    def flush(self) -> list[dict]:
        """The rows since the last flush, summed over ranks (a collective: every rank calls it at the same steps),
        with the window's img/s and the loss scales as host floats. Note: a host-device sync point."""
        if not self.rows:
            return []
        counts = torch.tensor([[r.pop("samples"), r["micro"]] for r in self.rows], dtype=torch.float32)
        totals = torch.cat([torch.stack([r.pop("totals") for r in self.rows]), counts.to(self.device)], dim=1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)
        scales = [r["loss_scale"] for r in self.rows]
        if any(torch.is_tensor(s) for s in scales):
            scales = torch.stack([torch.as_tensor(s, dtype=torch.float32, device=self.device) for s in scales]).tolist()
        now = time.perf_counter()
        micro = sum(r.pop("micro") for r in self.rows)
        speed = micro * self.images_per_micro_step / max(now - self.window, 1e-9)
        rows, self.rows, self.window = self.rows, [], now
        for row, scale, (loss, correct, seen, micro_batches) in zip(rows, scales, totals.tolist(), strict=True):
            row.update(
                epoch=row["step"] / self.steps_per_epoch,
                loss=loss / micro_batches,
                loss_scale=float(scale),
                error=100 * (1 - correct / seen),
                images_per_sec=speed,
            )
        return rows

    def elapsed(self) -> float:
        """Seconds since the epoch's first step began."""
        return time.perf_counter() - self.start
