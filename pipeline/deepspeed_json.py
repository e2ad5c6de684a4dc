"""The DeepSpeed JSON of a run: its precision mode, how the batch splits over ranks and micro-batches, and the
configuration fitted to this run's world and host (gradient accumulation, bf16 "auto", clipping, the all-reduce
type, a GPU configuration on a CPU host), each change said in one line.

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
from dataclasses import dataclass

import simple_parsing
import torch

from pipeline import cpu, gpu
from pipeline.scaling import LOSS_SCALED
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
    if loss_scale_window and mode not in LOSS_SCALED:
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
    if mode in LOSS_SCALED and not cuda:
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


@dataclass(frozen=True)
class DeepSpeedOptions:
    """The DeepSpeed configuration a run starts from, and whether a GPU one may run on a CPU host."""

    # DeepSpeed configuration (ds_configs/*.json): batch, precision, optimizer, schedule.
    deepspeed_config: str = simple_parsing.field(default="", alias="--deepspeed_config")
    # Run a GPU configuration (fp16, --data-device gpu) on a host where CUDA is not usable: the fp16 wrapper trains
    # in bf16 where DeepSpeed's accelerator refuses fp16, decoding runs on the CPU. Without it such a run stops
    # before any work, saying why CUDA is not usable.
    allow_cpu: bool = False

    def __post_init__(self):
        if not self.deepspeed_config:
            raise ValueError("--deepspeed_config is required: one of ds_configs/*.json (cpu.json on a CPU host)")
