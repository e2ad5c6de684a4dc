"""The model: a torchvision classifier set up the way the large-minibatch recipe needs it."""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck


def architectures() -> list[str]:
    """Names of torchvision's classification models."""
    return torchvision.models.list_models(module=torchvision.models)


def check_arch(arch: str) -> None:
    """Refuse a name that is not a torchvision classification model, with the list to choose from."""
    if arch not in architectures():
        names = ", ".join(architectures())
        raise ValueError(f"--arch {arch}: not a torchvision classification model; choose from {names}")


def zero_init_residual(model: nn.Module) -> int:
    """Set gamma of the last BN in every residual block to 0, so each block starts as the identity; returns how many."""
    zeroed = 0
    for block in model.modules():
        last = block.bn3 if isinstance(block, Bottleneck) else block.bn2 if isinstance(block, BasicBlock) else None
        if last is not None:
            nn.init.zeros_(last.weight)
            zeroed += 1
    return zeroed


def uses_channels_last(memory_format: str, cuda: bool) -> bool:
    """Whether a run's --memory-format means NHWC: channels_last, or auto on a GPU (Tensor Cores read NHWC)."""
    return memory_format == "channels_last" or (memory_format == "auto" and cuda)


def build_model(arch: str, num_classes: int, channels_last: bool = False) -> tuple[nn.Module, int]:
    """A freshly initialised `arch` for `num_classes` classes, and the number of residual BNs zeroed. Channels-last
    is for plain PyTorch; a DeepSpeed engine's model is converted after initialize (engine.to_channels_last)."""
    check_arch(arch)
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    zeroed = zero_init_residual(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, zeroed


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights only: none on BN gamma/beta or biases (Jia et al.)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # 1-d parameters are BN (and other norm) gammas and betas, and biases.
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
