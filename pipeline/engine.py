"""The DeepSpeed engine: built from the fitted configuration (pipeline.deepspeed_json) over a torchvision model and
made ready to train: the workarounds DeepSpeed's wrappers need (batch norm in fp32, the start-up step undone, the
overflow check read once, channels-last masters), the model as an engine of a precision computes (`InPrecision`,
for evaluation), and the model and optimizer options.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from pipeline import schedule as schedules
from pipeline.deepspeed_json import DATA_DTYPES
from pipeline.loss_scale import unscale_by_the_scale_of_backward, wrapper_scale
from pipeline.model import param_groups
from pipeline.schedule import Schedule


def lars(groups: list[dict], sgd: dict, trust: float):
    """LARS with Nesterov momentum (timm's), with SGD's lr, momentum and weight decay; BN and biases (the
    groups without weight decay) keep the plain lr. Clipped (LARC): a layer never gets more than the lr."""
    from timm.optim import Lars

    return Lars(
        groups,
        lr=sgd["lr"],
        momentum=sgd.get("momentum", 0.9),
        nesterov=True,
        trust_coeff=trust,
        weight_decay=sgd.get("weight_decay", 0.0),
        trust_clip=True,
    )


def build(
    model: nn.Module,
    ds: dict,
    schedule: Schedule,
    optimizer: str = "sgd",
    lars_trust: float = 0.02,
    compile_mode: str = "none",
    channels_last: bool = False,
):
    """A DeepSpeed engine over `model` (NCHW) with Nesterov SGD from `ds` (or LARS) and the run's schedule (built by
    DeepSpeed from `ds`'s "scheduler" for its types: see with_schedule), made ready to train: the initial weights
    as built, batch norm in fp32, full-size fp16 updates on loss-scale growth steps, the lr of step 0, the weights
    channels-last if asked (see to_channels_last), and the model torch.compiled in `compile_mode` unless that is
    "none"."""
    import deepspeed

    sgd = ds["optimizer"]["params"]
    groups = param_groups(model, sgd.get("weight_decay", 0.0))
    client_optimizer = None
    if optimizer == "lars":
        # A client optimizer replaces the configuration's; DeepSpeed still wraps it for fp16/bf16 and fp32 masters.
        ds = {k: v for k, v in ds.items() if k != "optimizer"}
        client_optimizer = lars(groups, sgd, lars_trust)
    if schedule.deepspeed != ("scheduler" in ds):
        raise ValueError(f"{schedule.kind}: build the engine from deepspeed_json.with_schedule's configuration")
    initial = {p: p.detach().clone() for p in model.parameters()}
    with _quiet(_NOT_STARTED):
        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=groups,
            optimizer=client_optimizer,
            config=ds,
            # None: DeepSpeed builds the configuration's scheduler (a client scheduler would override it).
            lr_scheduler=None if schedule.deepspeed else (lambda opt: schedules.GoyalSteps(opt, schedule)),
        )
    keep_norms_fp32(engine)
    undo_startup_step(engine, initial)
    if wrapper_scale(engine) is not None:
        unscale_by_the_scale_of_backward(engine.optimizer)
    schedules.follow(engine)
    if hasattr(engine.optimizer, "overflow_checker"):
        engine.optimizer.overflow_checker = one_read_overflow_check(engine)
    if channels_last:
        to_channels_last(engine)
    match_state_layout(engine.optimizer)
    if compile_mode != "none":
        # Compiled in place (nn.Module.compile): checkpoints keep the plain parameter names. The first steps
        # of a run (and of each new input shape) spend their time compiling.
        engine.compile(compile_kwargs={} if compile_mode == "default" else {"mode": compile_mode})
    return engine


# DeepSpeed's schedulers say this when built (at iteration -1, before `follow` sets step 0): nothing to act on.
_NOT_STARTED = "Attempting to get learning rate from scheduler before it has started"


@contextmanager
def _quiet(message: str):
    """DeepSpeed's log without `message`, inside the block."""
    from deepspeed.utils import logger

    def keep(record: logging.LogRecord) -> bool:
        return record.getMessage() != message

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _flat(opt) -> bool:
    """Whether the optimizer wrapper makes the weights views into one flat buffer (FP16_Optimizer, BF16_Optimizer,
    ZeRO): their dtype and layout cannot be changed one tensor at a time."""
    return any(hasattr(opt, flat) for flat in ("fp16_groups_flat", "bf16_groups_flat", "bit16_groups_flat"))


def _masters(opt) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(model weight, fp32 master copy) pairs of DeepSpeed's unfused mixed-precision wrapper; none without one."""
    return [
        (p, m)
        for low, high in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", []), strict=True)
        for p, m in zip(low, high, strict=True)
    ]


def _optimizer_state(opt):
    """(parameter, state dict) of every parameter the inner torch optimizer updates (the masters under a wrapper)."""
    inner = getattr(opt, "optimizer", opt)
    for group in inner.param_groups:
        for p in group["params"]:
            yield p, inner.state[p]


def keep_norms_fp32(engine) -> int:
    """Numerics: batch-norm weights and running statistics back to fp32 after DeepSpeed's fp16/bf16 wrapper cast
    them to 16 bits (running means in bf16 lose small updates). Torch's batch norm takes 16-bit activations with
    fp32 weights, as under autocast. Returns how many norm layers; none with flat-buffer wrappers (ZeRO)."""
    if _flat(engine.optimizer):
        return 0
    norms = [m for m in engine.module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    for norm in norms:
        # In place of the storage, not the Parameter: the wrapper's references stay valid.
        norm.float()
    return len(norms)


class InPrecision(nn.Module):
    """A model that computes as an engine of precision `mode` does in its forward pass (evaluate's model): the
    wrappers' 16-bit weights with fp32 norms, or fp32 weights under torch.autocast (as DeepSpeed's torch_autocast
    runs the forward), or fp32. Its inputs come in DATA_DTYPES[mode], as the run's reader hands them."""

    def __init__(self, model: nn.Module, mode: str, device_type: str):
        super().__init__()
        self.dtype = getattr(torch, DATA_DTYPES[mode])
        self.autocast, self.device_type = mode.startswith("autocast-"), device_type
        if mode in ("fp16", "bf16"):
            # The wrappers' 16-bit weights; norms keep their fp32 values (a round trip through 16 bits would not).
            for module in model.modules():
                if not isinstance(module, nn.modules.batchnorm._NormBase):
                    for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                        tensor.data = tensor.data.to(self.dtype)
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.autocast:
            return self.model(images)
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.model(images)


def undo_startup_step(engine, initial: dict[nn.Parameter, torch.Tensor]) -> None:
    """Undo the optimizer step DeepSpeed's unfused wrapper takes on zero gradients when it is built (to create the
    optimizer state): it applied one weight-decay step at the peak lr to the fp32 masters and left momentum
    buffers of w * decay. The masters and weights go back to `initial`, the state tensors to zero (with
    dampening 0, a zero momentum buffer steps exactly like a fresh one)."""
    pairs = _masters(engine.optimizer)
    if not pairs:
        return
    with torch.no_grad():
        for p, master in pairs:
            master.copy_(initial[p])
            p.copy_(initial[p])
        for _, state in _optimizer_state(engine.optimizer):
            for value in state.values():
                if torch.is_tensor(value) and value.dim():
                    value.zero_()


def to_channels_last(engine) -> None:
    """Put the 4-d weights, and the fp32 master copies DeepSpeed's mixed-precision optimizer keeps of them, in
    channels-last (NHWC) memory. Only after deepspeed.initialize: its first weight broadcast views every parameter
    as bytes, which channels-last strides refuse. Masters and weights (so gradients) must share a layout: fused
    SGD walks them as flat memory, and a mismatch gives a wrong update without an error (torch 2.15, CPU)."""
    if _flat(engine.optimizer):
        # These wrappers make the weights views into one flat buffer; a new layout would cut them off from it.
        raise ValueError(
            f"--memory-format channels_last: not supported with {type(engine.optimizer).__name__} "
            "(flat buffers); use --memory-format contiguous"
        )
    masters = [m for _, m in _masters(engine.optimizer)]
    for p in [*engine.module.parameters(), *masters]:
        if p.dim() == 4:
            # In place of the storage, not the Parameter: the optimizer's references stay valid.
            p.data = p.data.contiguous(memory_format=torch.channels_last)


def match_state_layout(opt) -> None:
    """Give every optimizer-state tensor its parameter's strides, values kept (after a layout change or a resume
    from a checkpoint of another layout): CUDA's fused SGD refuses momentum buffers laid out unlike their weight."""
    for p, state in _optimizer_state(opt):
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def one_read_overflow_check(engine):
    """DeepSpeed's overflow check for its fp16/bf16 wrapper, reading one flag per step instead of one per
    parameter tensor (about 160 blocking reads per ResNet-50 step)."""
    from deepspeed.runtime.utils import CheckOverflow

    class OneRead(CheckOverflow):
        def has_overflow_serial(self, params) -> bool:
            by_dtype = defaultdict(list)
            for p in params:
                if p.grad is not None:
                    by_dtype[p.grad.dtype].append(p.grad)
            if not by_dtype:
                return False
            device = next(iter(by_dtype.values()))[0].device
            found, one = torch.zeros(1, device=device), torch.ones(1, device=device)
            for grads in by_dtype.values():
                # AMP's multi-tensor check (GradScaler's): a few kernels per dtype, not one per tensor; it also
                # multiplies by 1, which changes nothing.
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)
            # Sync: one read per optimizer step; the wrapper decides on the host whether to skip the step.
            return bool(found.item())

    return OneRead(engine.optimizer.fp16_groups, mpu=engine.mpu, deepspeed=engine)


def lr(engine) -> float:
    """The learning rate the next optimizer step will use."""
    return engine.lr_scheduler.get_last_lr()[0]


OPTIMIZERS = ("sgd", "lars")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
# torch.compile modes (DeepSpeed's engine.compile); reduce-overhead also captures CUDA graphs.
COMPILE_MODES = ("none", "default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class ModelOptions:
    """The model, its optimizer and loss, and the speed settings the engine is built with."""

    # Any torchvision classification model (torchvision.models.list_models()).
    arch: str = "resnet50"
    # sgd (Nesterov, the paper's) or lars (layer-wise trust ratio on conv/linear weights, Nesterov; beyond 8k).
    optimizer: str = "sgd"
    # LARS: a layer's lr is min(lr, lars_trust * |w| / (|g| + wd |w|)) (LARC's clipped form, as in NVIDIA apex).
    lars_trust: float = 0.02
    # Label smoothing of the training loss (0.1 beyond 8k in Jia et al.; 0 in Goyal et al.).
    label_smoothing: float = 0.0
    # Batch-norm statistics over the whole global batch (torch's SyncBatchNorm) instead of each rank's own
    # micro-batch, as Goyal et al. keep them; costs an all-reduce per BN layer in the forward and backward passes.
    sync_bn: bool = False
    # Blur before every strided convolution with at least 16 input channels (timm's BlurPool2d; FFCV's recipes).
    blurpool: bool = False
    # Image and activation memory: auto (channels-last, NHWC, on GPUs; NCHW on CPUs), channels_last or contiguous.
    memory_format: str = "auto"
    # torch.compile the model through the engine: none, or a torch.compile mode (reduce-overhead: CUDA graphs).
    compile: str = "none"

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer {self.optimizer}: use one of {', '.join(OPTIMIZERS)}")
        if self.lars_trust <= 0:
            raise ValueError(f"--lars-trust {self.lars_trust}: must be positive")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"--label-smoothing {self.label_smoothing}: must lie in [0, 1)")
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"--memory-format {self.memory_format}: use one of {', '.join(MEMORY_FORMATS)}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"--compile {self.compile}: use one of {', '.join(COMPILE_MODES)}")
