"""Small models for the engine's tests."""

from __future__ import annotations

import torch

from pipeline.schedule import Schedule


def small_convnet() -> torch.nn.Module:
    """Conv, BN, ReLU, pooling and a linear layer: every parameter kind a ResNet has."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3),
    )  # fmt: skip


def constant_schedule(lr: float, total_steps: int, steps_per_epoch: int) -> Schedule:
    """A constant lr (the paper's schedule with nothing to warm up and no drop before the end)."""
    params = {"base_lr": lr, "peak_lr": lr, "warmup_steps": 0, "milestones": ()}
    return Schedule("goyal_steps", params, total_steps, steps_per_epoch, optimizer_lr=lr)
