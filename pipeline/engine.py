"""The DeepSpeed engine: a committed configuration fitted to this run's world, host and schedule."""

from __future__ import annotations

import copy

import torch
from torch import nn

from pipeline.model import param_groups
from pipeline.schedule import Schedule, StepLR, deepspeed_params

# Element type of the image batches for each precision.
DATA_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def precision(ds: dict) -> str:
    """fp16, bf16 or fp32, as the configuration asks."""
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


def fit(ds: dict, path: str, world_size: int, cuda: bool) -> tuple[dict, list[str]]:
    """The configuration fitted to this world and host, and one line per change made to the committed file."""
    ds, notes = copy.deepcopy(ds), []
    ds["gradient_accumulation_steps"] = grad_accum(ds, path, world_size)
    if "gradient_clipping" not in ds:
        # Numerics: DeepSpeed clips the gradient norm at 1.0 unless told otherwise; the recipe does not clip.
        ds["gradient_clipping"] = 0.0
        notes.append(f"{path}: no gradient_clipping given; not clipping (DeepSpeed's default would clip at 1.0)")
    if precision(ds) == "fp16" and not cuda:
        # Decision: fp16 on a CPU host trains in bf16 (announced here and in the run config), because
        # DeepSpeed refuses fp16 without a GPU and bf16 keeps the same fp32 master weights.
        ds.pop("fp16")
        ds["bf16"] = {"enabled": True}
        ds.setdefault("data_types", {})["buffer_dtype"] = "bf16"
        notes.append(f"{path}: fp16 needs a CUDA GPU; this CPU host trains in bf16 instead (no loss scaling)")
    if not cuda and ds.get("optimizer", {}).get("params", {}).pop("fused", False):
        notes.append(f"{path}: fused SGD kernels are for CUDA; using torch's default SGD on this CPU host")
    return ds, notes


def with_schedule(ds: dict, schedule: Schedule) -> dict:
    """The configuration with the schedule derived from the real dataset in place of the committed one."""
    ds = copy.deepcopy(ds)
    if schedule.kind == "warmup_decay":
        ds["scheduler"] = {"type": "WarmupDecayLR", "params": deepspeed_params(schedule)}
    else:
        # goyal_steps is not a DeepSpeed scheduler: StepLR is handed to deepspeed.initialize instead.
        ds.pop("scheduler", None)
    ds.setdefault("optimizer", {}).setdefault("params", {})["lr"] = schedule.peak_lr
    return ds


def lars(groups: list[dict], sgd: dict, trust: float):
    """LARS with Nesterov momentum (timm's), with SGD's lr, momentum and weight decay; BN and biases (the
    groups without weight decay) keep the plain lr. Clipped (LARC): a layer never gets more than the lr."""
    from timm.optim import Lars

    return Lars(groups, lr=sgd["lr"], momentum=sgd.get("momentum", 0.9), nesterov=True, trust_coeff=trust,
                weight_decay=sgd.get("weight_decay", 0.0), trust_clip=True)  # fmt: skip


def build(
    model: nn.Module,
    ds: dict,
    schedule: Schedule,
    optimizer: str = "sgd",
    lars_trust: float = 0.02,
    compile_mode: str = "none",
    channels_last: bool = False,
):
    """A DeepSpeed engine over `model` (NCHW) with Nesterov SGD from `ds` (or LARS) and the run's schedule; its
    weights then made channels-last if asked (see to_channels_last), and the model torch.compiled in `compile_mode`
    unless that is "none"."""
    import deepspeed

    sgd = ds["optimizer"]["params"]
    groups = param_groups(model, sgd.get("weight_decay", 0.0))
    client_optimizer = None
    if optimizer == "lars":
        # A client optimizer replaces the configuration's; DeepSpeed still wraps it for fp16/bf16 and fp32 masters.
        ds = {k: v for k, v in ds.items() if k != "optimizer"}
        client_optimizer = lars(groups, sgd, lars_trust)
    client_scheduler = None if schedule.kind == "warmup_decay" else (lambda opt: StepLR(opt, schedule))
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=groups, optimizer=client_optimizer, config=ds, lr_scheduler=client_scheduler
    )
    if channels_last:
        to_channels_last(engine)
    if compile_mode != "none":
        # Compiled in place (nn.Module.compile): checkpoints keep the plain parameter names. The first steps
        # of a run (and of each new input shape) spend their time compiling.
        engine.compile(compile_kwargs={} if compile_mode == "default" else {"mode": compile_mode})
    return engine


def to_channels_last(engine) -> None:
    """Put the 4-d weights, and the fp32 master copies DeepSpeed's mixed-precision optimizer keeps of them, in
    channels-last (NHWC) memory. Only after deepspeed.initialize: its first weight broadcast views every parameter
    as bytes, which channels-last strides refuse. Masters and weights (so gradients) must share a layout: fused
    SGD walks them as flat memory, and a mismatch gives a wrong update without an error (torch 2.15, CPU)."""
    opt = engine.optimizer
    if any(hasattr(opt, flat) for flat in ("fp16_groups_flat", "bf16_groups_flat")):
        # These wrappers make the weights views into one flat buffer; a new layout would cut them off from it.
        raise ValueError(f"--memory-format channels_last: not supported with {type(opt).__name__} (flat buffers); "
                         "use --memory-format contiguous")  # fmt: skip
    masters = [p for group in getattr(opt, "fp32_groups", []) for p in group]
    for p in [*engine.module.parameters(), *masters]:
        if p.dim() == 4:
            # In place of the storage, not the Parameter: the optimizer's references stay valid.
            p.data = p.data.contiguous(memory_format=torch.channels_last)


def loss_scale(engine) -> float:
    """The current fp16 loss scale (1.0 without loss scaling)."""
    scaler = getattr(engine.optimizer, "loss_scale_config", engine.optimizer)
    return float(getattr(scaler, "cur_scale", 1.0))


def lr(engine) -> float:
    """The learning rate the next optimizer step will use."""
    return engine.lr_scheduler.get_last_lr()[0]
