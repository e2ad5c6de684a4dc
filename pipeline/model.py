"""The model: a torchvision classifier set up the way the large-minibatch recipe needs it."""

from __future__ import annotations

import torch
import torch.distributed as dist
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


class BlurPoolConv2d(nn.Module):
    """A strided convolution that sees its input low-pass filtered first (Zhang 2019, "Making convolutional networks
    shift-invariant again"; FFCV's ResNet-50 recipes): timm's BlurPool2d (a 3x3 binomial filter, reflect padding) at
    stride 1, then the convolution with its own stride."""

    def __init__(self, conv: nn.Conv2d):
        # Imported here: timm's layers cost every process about a second of imports, and only --blurpool uses them.
        from timm.layers import BlurPool2d

        super().__init__()
        self.blur = BlurPool2d(conv.in_channels, filt_size=3, stride=1)
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.blur.filt.dtype != x.dtype:
            # DeepSpeed's 16-bit wrappers cast the parameters, not this non-persistent buffer; its binomial
            # coefficients (k/16) are exact in every float type.
            self.blur.filt.data = self.blur.filt.data.to(x.dtype)
        return self.conv(self.blur(x))


# FFCV's rule: blur before every strided convolution with at least this many input channels (not the stem's RGB).
BLURPOOL_MIN_CHANNELS = 16


def add_blurpool(model: nn.Module) -> int:
    """Put a blur before every strided convolution with at least BLURPOOL_MIN_CHANNELS input channels, in place;
    returns how many. Weight keys of those convolutions gain `.conv` (the model card says blurpool)."""
    added = 0
    for name, child in model.named_children():
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= BLURPOOL_MIN_CHANNELS:
            setattr(model, name, BlurPoolConv2d(child))
            added += 1
        else:
            added += add_blurpool(child)
    return added


def build_model(
    arch: str, num_classes: int, channels_last: bool = False, blurpool: bool = False
) -> tuple[nn.Module, int]:
    """A freshly initialised `arch` for `num_classes` classes (with `blurpool`, blurred strided convolutions), and the
    number of residual BNs zeroed. Channels-last is for plain PyTorch; a DeepSpeed engine's model is converted after
    initialize (engine.to_channels_last)."""
    check_arch(arch)
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    zeroed = zero_init_residual(model)
    if blurpool:
        add_blurpool(model)
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


class _GroupSum(torch.autograd.Function):
    """Sum over the ranks of a group; its gradient is the sum of the ranks' gradients (each rank's loss depends on
    every rank's input through the sum)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class CpuSyncBatchNorm(nn.SyncBatchNorm):
    """torch's SyncBatchNorm for ranks without a GPU (its statistics kernels are CUDA-only): each rank's per-channel
    sums, sums of squares and counts are summed over the group by an all-reduce that autograd sees through, so the
    forward and backward passes are those of batch norm over the whole global batch, as on GPUs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.process_group or (dist.group.WORLD if dist.is_initialized() else None)
        if x.is_cuda or not self.training or group is None or dist.get_world_size(group) == 1:
            return super().forward(x)
        c, dims = x.shape[1], [0, *range(2, x.ndim)]
        xf = x.float()
        # Sums in float64, so that E[x^2] - E[x]^2 does not cancel away the variance.
        xd = x.double()
        local = torch.cat([xd.sum(dims), (xd * xd).sum(dims), xd.new_tensor([x.numel() / c])])
        total = _GroupSum.apply(local, group)
        n = total[-1]
        mean64 = total[:c] / n
        mean, var = mean64.float(), (total[c : 2 * c] / n - mean64 * mean64).clamp_min(0).float()
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * n / (n - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        shape = [1, c] + [1] * (x.ndim - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.float().view(shape) + self.bias.float().view(shape)
        return y.to(x.dtype)


def sync_batch_norm(model: nn.Module, cuda: bool) -> nn.Module:
    """`model` with every batch norm computing its statistics over all ranks (--sync-bn): torch's SyncBatchNorm,
    or on ranks without a GPU its CPU form above. Weights and statistics carry over; state-dict keys are unchanged."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if not cuda:
        for m in model.modules():
            if type(m) is nn.SyncBatchNorm:
                m.__class__ = CpuSyncBatchNorm
    return model
