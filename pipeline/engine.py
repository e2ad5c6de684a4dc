"""The DeepSpeed engine: a committed configuration fitted to this run's world and host, then built ready to train.

Precision modes (`precision(ds)`), each with fp32 master weights and fp32 batch norm:
- `fp16` / `bf16`: DeepSpeed's wrapper of a torch optimizer (FP16_UnfusedOptimizer). Conv and linear weights are
  16-bit with fp32 masters; fp16 has DeepSpeed's dynamic loss scaling. Its step loops over the parameters in
  Python and decides on the host whether to skip, so it syncs with the device every optimizer step.
- `autocast-fp16` / `autocast-bf16`: DeepSpeed's `torch_autocast`. The weights stay fp32, the forward pass runs
  under torch.autocast, and fp16 scales the loss with torch's GradScaler: the numerics of plain PyTorch AMP. With
  fused SGD the whole step runs without a host-device sync.
- `fp32`.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from pipeline import cpu, gpu
from pipeline import schedule as schedules
from pipeline.model import param_groups
from pipeline.options import at_least
from pipeline.scaling import REFERENCE_BATCH, REFERENCE_LR
from pipeline.schedule import Schedule

# Element type of the image batches for each precision: what the first convolution computes in.
DATA_DTYPES = {
    "fp16": "float16",
    "bf16": "bfloat16",
    "fp32": "float32",
    "autocast-fp16": "float16",
    "autocast-bf16": "bfloat16",
}
# torch.compile modes that capture CUDA graphs.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def precision(ds: dict) -> str:
    """The precision mode the configuration asks for (one of pipeline.scaling.PRECISIONS)."""
    autocast = ds.get("torch_autocast", {})
    if autocast.get("enabled"):
        dtype = str(autocast.get("dtype", ""))
        if dtype not in ("fp16", "float16", "torch.float16", "half", "bf16", "bfloat16", "torch.bfloat16"):
            raise ValueError(f"torch_autocast.dtype {dtype or None!r}: set it to fp16 or bf16")
        return "autocast-bf16" if "bf" in dtype else "autocast-fp16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    return "fp32"


def grad_accum(ds: dict, path: str, world_size: int) -> int:
    """Micro-steps per optimizer step: train_batch_size / (micro-batch x ranks), which must divide evenly."""
    batch, micro = ds.get("train_batch_size"), ds.get("train_micro_batch_size_per_gpu")
    if not isinstance(batch, int) or not isinstance(micro, int):
        raise ValueError(
            f"{path}: needs integer train_batch_size and train_micro_batch_size_per_gpu; "
            "generate one with python -m pipeline.scaling"
        )
    if batch % (micro * world_size):
        raise ValueError(
            f"{path}: train_batch_size {batch} is not a multiple of micro-batch {micro} x {world_size} ranks; "
            "run on a rank count that divides it or generate a configuration with python -m pipeline.scaling"
        )
    return batch // (micro * world_size)


def configure(
    ds: dict, path: str, world_size: int, cuda: bool, allow_cpu: bool = False, loss_scale_window: int = 0
) -> tuple[dict, list[str]]:
    """The configuration fitted to this world and host, and one line per change made to the committed file.
    A configuration for GPUs (fp16) on a host where CUDA is not usable stops here unless `allow_cpu`.
    `loss_scale_window` (when not 0) becomes DeepSpeed's fp16.loss_scale_window; see set_growth_interval for the
    autocast mode's GradScaler."""
    ds, notes = copy.deepcopy(ds), []
    ds["gradient_accumulation_steps"] = grad_accum(ds, path, world_size)
    notes += resolve_auto_bf16(ds, path, cuda)
    mode = precision(ds)
    if loss_scale_window and mode not in ("fp16", "autocast-fp16"):
        raise ValueError(
            f"--loss-scale-window {loss_scale_window}: {path} trains in {mode}, which has no loss "
            "scale; leave the flag out or use an fp16 configuration"
        )
    if loss_scale_window and mode == "fp16":
        ds["fp16"]["loss_scale_window"] = loss_scale_window
    if "gradient_clipping" not in ds:
        # Numerics: DeepSpeed clips the gradient norm at 1.0 unless told otherwise; the recipe does not clip.
        ds["gradient_clipping"] = 0.0
        notes.append(f"{path}: no gradient_clipping given; not clipping (DeepSpeed's default would clip at 1.0)")
    if "timers" not in ds:
        # Sync: DeepSpeed's throughput timer is on by default and synchronises the device twice per micro-step.
        ds["timers"] = {"throughput": {"enabled": False, "synchronized": False}}
    if mode in ("fp16", "autocast-fp16") and not cuda:
        if not allow_cpu:
            raise ValueError(gpu.refusal(f"{path} asks for {mode}"))
        if mode == "fp16" and not accelerator_fp16():
            # DeepSpeed's CPU accelerator refuses its fp16 wrapper; bf16 keeps the same fp32 master weights.
            ds.pop("fp16")
            ds["bf16"] = {"enabled": True}
            notes.append(
                f"{path}: --allow-cpu: DeepSpeed's fp16 wrapper needs an accelerator with fp16; this CPU host "
                "trains in bf16 (no loss scaling)"
            )
        else:
            notes.append(f"{path}: --allow-cpu: {mode} on this CPU host")
    mode = precision(ds)
    if mode in ("fp16", "bf16") and "communication_data_type" not in ds:
        # Numerics: the wrapper's default all-reduces in its 16-bit type, which would round batch norm's fp32
        # gradients to 16 bits and sum the ranks' 16-bit gradients in 16 bits; fp32 does neither.
        ds["communication_data_type"] = "fp32"
        notes.append(
            f"{path}: no communication_data_type given; all-reducing gradients in fp32 (DeepSpeed's default "
            f"would round batch norm's fp32 gradients to {mode})"
        )
    if not cuda and mode != "fp32" and not cpu.native(mode.removeprefix("autocast-")):
        notes.append(
            f"{path}: {mode} on a CPU without native {mode.removeprefix('autocast-')} ({cpu.capability()}): its "
            f"kernels are emulated, {cpu.EMULATED_SLOWDOWN}; for fp32 use ds_configs/cpu.json or a configuration "
            "from python -m pipeline.scaling --precision fp32"
        )
    if not cuda and ds.get("optimizer", {}).get("params", {}).pop("fused", False):
        notes.append(f"{path}: fused SGD kernels are for CUDA; using torch's default SGD on this CPU host")
    return ds, notes


def accelerator_fp16() -> bool:
    """Whether DeepSpeed's accelerator builds its fp16 wrapper here (CUDA; its CPU accelerator says no)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().is_fp16_supported()


def resolve_auto_bf16(ds: dict, path: str, cuda: bool) -> list[str]:
    """Settle `"bf16": {"enabled": "auto"}` (ds_configs/cpu.json) in place: bf16 where this host computes it
    natively (a GPU with bf16, a CPU with bf16 instructions), fp32 elsewhere; returns the note saying which."""
    if ds.get("bf16", {}).get("enabled") != "auto":
        return []
    native = torch.cuda.is_bf16_supported() if cuda else cpu.native("bf16")
    where = "this GPU" if cuda else f"this CPU ({cpu.described()})"
    if native:
        ds["bf16"]["enabled"] = True
    else:
        ds.pop("bf16")
    return [f'{path}: bf16 "auto": {"bf16" if native else "fp32"} on {where}']


def check_combination(ds: dict, path: str, channels_last: bool, compile_mode: str) -> None:
    """Refuse settings that together crash or train wrongly, before any work (ValueError, one line)."""
    accum, stage = ds["gradient_accumulation_steps"], ds.get("zero_optimization", {}).get("stage", 0)
    if compile_mode in CUDA_GRAPH_MODES and accum > 1:
        # CUDA graphs own the .grad buffers; accumulation adds into them between replays and gets overwritten
        # (PyTorch issues 169545, 96693: an error, or silently wrong gradients).
        raise ValueError(
            f"--compile {compile_mode} captures CUDA graphs, which cannot accumulate gradients ({path}: {accum} "
            "micro-steps per optimizer step); make train_micro_batch_size_per_gpu the rank's whole batch, or use "
            "--compile default"
        )
    if stage and channels_last:
        # ZeRO re-links the weights to flat NCHW views of its buffers after every step, undoing the layout.
        raise ValueError(
            f"{path}: zero_optimization stage {stage} cannot keep channels-last weights; use --memory-format "
            "contiguous, or ZeRO stage 0 (data parallelism needs no ZeRO for ResNet-sized models)"
        )


def with_schedule(ds: dict, schedule: Schedule) -> dict:
    """The configuration that builds `schedule`: DeepSpeed's scheduler section for its types (none for
    goyal_steps, whose scheduler build() hands to DeepSpeed), and the optimizer's lr."""
    ds = {k: v for k, v in copy.deepcopy(ds).items() if k != "scheduler"}
    if schedule.deepspeed:
        ds["scheduler"] = {"type": schedule.kind, "params": dict(schedule.params)}
    lr = schedule.optimizer_lr or schedule.peak_lr
    ds.setdefault("optimizer", {}).setdefault("params", {})["lr"] = lr
    return ds


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
        raise ValueError(f"{schedule.kind}: build the engine from engine.with_schedule's configuration")
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
        self.dtype, self.autocast, self.device_type = (
            getattr(torch, DATA_DTYPES[mode]),
            mode.startswith("auto"),
            device_type,
        )
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


def unscale_by_the_scale_of_backward(wrapper) -> None:
    """Numerics: make DeepSpeed's fp16 wrapper divide the gradients by the loss scale they were multiplied by.
    DeepSpeed 0.19.8's `step` doubles the scale (on the step that ends a window of clean steps) before it unscales,
    so that step's gradients, scaled by S, would be divided by 2S: a half-size update once per loss_scale_window
    (with clipping, hidden only where the clip factor is 2 or more). The scale is read as `step` starts (the one
    backward used) and stands in for the grown one while DeepSpeed's own unscale-and-clip runs; in any other order
    of DeepSpeed's the two are the same number and this changes nothing."""
    config, step, unscale = wrapper.loss_scale_config, wrapper.step, wrapper.unscale_and_clip_grads
    used = {}

    def step_from_its_scale(*args, **kwargs):
        used["scale"] = config.cur_scale
        return step(*args, **kwargs)

    def unscale_by_the_used_scale(*args, **kwargs):
        grown, config.cur_scale = config.cur_scale, used.get("scale", config.cur_scale)
        try:
            return unscale(*args, **kwargs)
        finally:
            config.cur_scale = grown

    wrapper.step, wrapper.unscale_and_clip_grads = step_from_its_scale, unscale_by_the_used_scale


def set_growth_interval(engine, steps: int) -> None:
    """The fp16 loss scale doubles after `steps` optimizer steps without an overflow (0: leave it as it is).
    Autocast fp16: torch's GradScaler, built by DeepSpeed with its default of 2000. DeepSpeed's wrapper: its
    scaler, for after a resume, which restores the window saved in the checkpoint. Nothing to do in other modes."""
    scaler, wrapper = engine.torch_autocast_z0_gradscaler, getattr(engine.optimizer, "loss_scale_config", None)
    if steps and scaler is not None:
        scaler.set_growth_interval(steps)
    elif steps and getattr(wrapper, "dynamic_loss_scale", False):
        wrapper.scale_window = steps


def wrapper_scale(engine):
    """The loss-scale state of DeepSpeed's fp16 wrapper (its `cur_scale` divides every gradient in `step()`), or
    None where no wrapper scales the loss (fp32, bf16, the autocast modes)."""
    scale = getattr(engine.optimizer, "loss_scale_config", None)
    return scale if getattr(scale, "use_grad_scaling", False) else None


def deepspeed_scales_loss(engine) -> bool:
    """Whether `engine.backward` multiplies the loss by the fp16 wrapper's scale itself, found by running it once on
    a loss of 0 and reading the gradient that reaches that loss: 1 where it does not (DeepSpeed 0.19.8 without ZeRO:
    only ZeRO optimizers and the autocast GradScaler scale there), the scale where it does (the fix proposed
    upstream, deepspeedai/DeepSpeed pull request 8393). Every rank calls it (the backward all-reduces); it leaves
    no gradient behind."""
    scale = wrapper_scale(engine)
    param = next(p for p in engine.module.parameters() if p.requires_grad)
    seen = []
    zero = param.reshape(-1)[0].float() * 0
    zero.register_hook(lambda grad: seen.append(grad))
    engine.backward(zero, scale_wrt_gas=False)
    for p in engine.module.parameters():
        p.grad = None
    # Sync: one read, once, when the engine is built.
    factor = float(seen[0])
    if factor not in (1.0, scale.cur_scale):
        raise RuntimeError(
            f"DeepSpeed {_deepspeed_version()} multiplied the fp16 loss by {factor}, neither 1 nor the loss scale "
            f"{scale.cur_scale}: check pipeline/engine.py's loss scaling against it"
        )
    return factor != 1.0


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


class LossScale:
    """The loss scale of an engine and the optimizer steps skipped for overflow, read without a host-device sync:
    from DeepSpeed's fp16 wrapper as host numbers, from torch's GradScaler (autocast fp16) as device values that
    `resolve` reads at the next flush. DeepSpeed does not count GradScaler skips: a drop of the scale is one.

    Trap: DeepSpeed's fp16 wrapper divides every gradient by its scale (2^16 at the start) in its step, but
    DeepSpeed 0.19.8's `engine.backward` never multiplies the loss by it without ZeRO, so every update would be
    2^-16 of its size. `for_backward` scales the loss where the installed DeepSpeed does not (found once, by
    `deepspeed_scales_loss`), and never twice."""

    def __init__(self, engine):
        self.engine, self.scaler = engine, engine.torch_autocast_z0_gradscaler
        # GradScaler mode: skips counted here, and the scale after the last resolved step (None: not started).
        self.scaler_skipped, self.last = 0, None
        # The fp16 wrapper's scale state, where this code must apply it to the loss.
        wrapper = wrapper_scale(engine)
        self.to_apply = wrapper if wrapper is not None and not deepspeed_scales_loss(engine) else None

    def for_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to hand to engine.backward: multiplied by the fp16 wrapper's current scale where DeepSpeed
        leaves that to us (a host float: no sync), else as it is."""
        return loss if self.to_apply is None else loss.float() * self.to_apply.cur_scale

    def now(self) -> tuple[float | torch.Tensor, int | None]:
        """After an optimizer step: the loss scale and the skipped steps so far (None until `resolve`)."""
        if self.scaler is None:
            wrapper = getattr(self.engine.optimizer, "loss_scale_config", self.engine.optimizer)
            return float(getattr(wrapper, "cur_scale", 1.0)), self.engine.skipped_steps
        # The scaler's own tensor is updated in place every step: keep this step's value (a device copy).
        scale = self.scaler._get_scale_async()
        return (float(self.scaler._init_scale) if scale is None else scale.clone()), None

    def resolve(self, rows: list[dict]) -> None:
        """Fill the skipped-step counts of flushed rows (their loss scales now host floats)."""
        for row in rows:
            if row["skipped_steps"] is None:
                before = self.last if self.last is not None else self.scaler._init_scale
                self.scaler_skipped += row["loss_scale"] < before
                self.last = row["loss_scale"]
                row["skipped_steps"] = self.scaler_skipped

    @property
    def skipped(self) -> int:
        """Optimizer steps skipped for overflow so far (resolved ones, under a GradScaler)."""
        return self.engine.skipped_steps if self.scaler is None else self.scaler_skipped

    def state_dict(self) -> dict:
        """For the checkpoint's client state: the GradScaler (DeepSpeed does not save it) and its skip count.
        Note: a host-device sync point (the scale is read)."""
        if self.scaler is None:
            return {}
        return {"grad_scaler": self.scaler.state_dict(), "skipped": self.scaler_skipped, "last": self.last}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` saved."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state["grad_scaler"])
            self.scaler_skipped, self.last = state["skipped"], state["last"]


def lr(engine) -> float:
    """The learning rate the next optimizer step will use."""
    return engine.lr_scheduler.get_last_lr()[0]


OPTIMIZERS = ("sgd", "lars")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
# torch.compile modes (DeepSpeed's engine.compile); reduce-overhead also captures CUDA graphs.
COMPILE_MODES = ("none", "default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class OptimOptions:
    """The model, the optimisation recipe and the precision and speed settings it runs with."""

    # DeepSpeed configuration (ds_configs/*.json): batch, precision, optimizer.
    deepspeed_config: str = ""
    # Any torchvision classification model (torchvision.models.list_models()).
    arch: str = "resnet50"
    # Epochs to train; the schedule is laid out over exactly this many.
    epochs: int = 90
    # Label smoothing of the training loss (0.1 beyond 8k in Jia et al.; 0 in Goyal et al.).
    label_smoothing: float = 0.0
    # deepspeed: the DeepSpeed configuration's scheduler, built by DeepSpeed, its step counts fitted to the data and
    # --epochs (ds_configs/: WarmupDecayLR, linear warmup from 0, then linearly to 0 at the end); goyal_steps: the
    # paper's (warmup from 0.1, x0.1 at epochs 30/60/80 of 90, scaled to --epochs).
    schedule: str = "deepspeed"
    # Epochs of linear warmup (default: the configuration's warmup_num_steps, fitted to the run; goyal_steps: 5 of
    # 90 epochs, scaled to shorter --epochs, none at or below B=256).
    warmup_epochs: float | None = None
    # The linear scaling rule's anchor: lr = reference_lr * B / reference_batch (0.1 at 256 in the paper).
    reference_batch: int = REFERENCE_BATCH
    reference_lr: float = REFERENCE_LR
    # sgd (Nesterov, the paper's) or lars (layer-wise trust ratio on conv/linear weights, Nesterov; beyond 8k).
    optimizer: str = "sgd"
    # LARS: a layer's lr is min(lr, lars_trust * |w| / (|g| + wd |w|)) (LARC's clipped form, as in NVIDIA apex).
    lars_trust: float = 0.02
    # Stop after this many optimizer steps in all (0: run every epoch); the schedule is unchanged.
    max_steps: int = 0
    # Stop after this many optimizer steps in a row skipped for overflow (0: never; fp16 also stops when
    # an overflow happens at the minimum loss scale).
    max_skipped_steps: int = 25
    # fp16's dynamic loss scale doubles after this many optimizer steps without an overflow (0: the
    # configuration's: fp16.loss_scale_window for DeepSpeed's wrapper, GradScaler's 2000 for autocast fp16).
    loss_scale_window: int = 0
    # Batch-norm statistics over the whole global batch (torch's SyncBatchNorm) instead of each rank's own
    # micro-batch, as Goyal et al. keep them; costs an all-reduce per BN layer in the forward and backward passes.
    sync_bn: bool = False
    # Run a GPU configuration (fp16, --data-device gpu) on a host where CUDA is not usable: the fp16 wrapper trains
    # in bf16 where DeepSpeed's accelerator refuses fp16, decoding runs on the CPU. Without it such a run stops
    # before any work, saying why CUDA is not usable.
    allow_cpu: bool = False
    # Image and activation memory: auto (channels-last, NHWC, on GPUs; NCHW on CPUs), channels_last or contiguous.
    memory_format: str = "auto"
    # torch.compile the model through the engine: none, or a torch.compile mode (reduce-overhead: CUDA graphs).
    compile: str = "none"

    def __post_init__(self):
        if not self.deepspeed_config:
            raise ValueError("--deepspeed_config is required: one of ds_configs/*.json (cpu.json on a CPU host)")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer {self.optimizer}: use one of {', '.join(OPTIMIZERS)}")
        if self.reference_batch < 1 or self.reference_lr <= 0 or self.lars_trust <= 0:
            raise ValueError(
                f"--reference-batch {self.reference_batch}, --reference-lr {self.reference_lr}, --lars-trust "
                f"{self.lars_trust}: all must be positive"
            )
        if self.schedule not in schedules.KINDS:
            raise ValueError(f"--schedule {self.schedule}: use one of {', '.join(schedules.KINDS)}")
        if self.epochs < 1:
            raise ValueError(f"--epochs {self.epochs}: must be at least 1")
        if self.warmup_epochs is not None and not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"--warmup-epochs {self.warmup_epochs}: must lie in [0, --epochs {self.epochs})")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"--label-smoothing {self.label_smoothing}: must lie in [0, 1)")
        at_least(self, ("max_steps", "max_skipped_steps", "loss_scale_window"), 0)
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"--memory-format {self.memory_format}: use one of {', '.join(MEMORY_FORMATS)}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"--compile {self.compile}: use one of {', '.join(COMPILE_MODES)}")
