"""The fp16 loss scale around DeepSpeed's: the loss scaling DeepSpeed 0.19.8's fp16 wrapper leaves out, its
growth steps unscaled by the scale backward used, the growth window, and the scale and skipped steps of a run read
without a host-device sync (`LossScale`, a checkpoint component)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.options import at_least


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
            f"{scale.cur_scale}: check pipeline/loss_scale.py against it"
        )
    return factor != 1.0


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


class LossScale:
    """The loss scale of an engine (a checkpoint component) and the optimizer steps skipped for overflow, read
    without a host-device sync: from DeepSpeed's fp16 wrapper as host numbers, from torch's GradScaler (autocast
    fp16) as device values that `resolve` reads at the next flush. DeepSpeed does not count GradScaler skips: a
    drop of the scale is one.

    Trap: DeepSpeed's fp16 wrapper divides every gradient by its scale (2^16 at the start) in its step, but
    DeepSpeed 0.19.8's `engine.backward` never multiplies the loss by it without ZeRO, so every update would be
    2^-16 of its size. `for_backward` scales the loss where the installed DeepSpeed does not (found once, by
    `deepspeed_scales_loss`), and never twice."""

    def __init__(self, engine, window: int = 0, deepspeed_scales: bool | None = None):
        """`window`: this session's --loss-scale-window (0: the configuration's). `deepspeed_scales`: whether the
        installed DeepSpeed scales the fp16 wrapper's loss itself (None: probe it now, deepspeed_scales_loss)."""
        self.engine, self.scaler, self.window = engine, engine.torch_autocast_z0_gradscaler, window
        # GradScaler mode: skips counted here, and the scale after the last resolved step (None: not started).
        self.scaler_skipped, self.last = 0, None
        # The fp16 wrapper's scale state, where this code must apply it to the loss.
        wrapper = wrapper_scale(engine)
        if wrapper is not None and deepspeed_scales is None:
            deepspeed_scales = deepspeed_scales_loss(engine)
        self.to_apply = wrapper if wrapper is not None and not deepspeed_scales else None

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
        """Restore what `state_dict` saved; the growth window given to this session (--loss-scale-window) wins
        over the one the checkpoint brought back (DeepSpeed's wrapper restores its own with its state)."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state["grad_scaler"])
            self.scaler_skipped, self.last = state["skipped"], state["last"]
        set_growth_interval(self.engine, self.window)


@dataclass(frozen=True)
class LossScaleOptions:
    """fp16's dynamic loss scale, and when its overflows stop the run."""

    # fp16's dynamic loss scale doubles after this many optimizer steps without an overflow (0: the
    # configuration's: fp16.loss_scale_window for DeepSpeed's wrapper, GradScaler's 2000 for autocast fp16).
    loss_scale_window: int = 0
    # Stop after this many optimizer steps in a row skipped for overflow (0: never; fp16 also stops when
    # an overflow happens at the minimum loss scale).
    max_skipped_steps: int = 25

    def __post_init__(self):
        at_least(self, ("loss_scale_window", "max_skipped_steps"), 0)
