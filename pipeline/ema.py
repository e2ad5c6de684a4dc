"""An exponential moving average of the weights (MosaicML's and torchvision's recipes): timm's ModelEmaV3 in fp32,
batch-norm buffers included, updated every `--ema-every` optimizer steps, validated beside the raw weights, saved
in checkpoints (a component) and exported on request (python -m pipeline.export --ema).

Every rank holds the same average: the weights are the same on every rank after each step, and the update reads
rank 0's batch-norm buffers (each rank's own statistics differ, Goyal et al.), as validation does.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from pipeline import distributed
from pipeline.engine import InPrecision
from pipeline.meters import validate
from pipeline.options import at_least


@dataclass(frozen=True)
class EmaOptions:
    """An average of the weights kept beside them."""

    # Decay of the weights' exponential moving average per optimizer step, e.g. 0.9998 (0: no average). Validated
    # beside the raw weights (val_top1_ema), saved with every checkpoint, exported with --ema.
    ema_decay: float = 0.0
    # Update the average every this many optimizer steps, each update decaying by ema_decay ** ema_every.
    ema_every: int = 1

    def __post_init__(self):
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"--ema-decay {self.ema_decay}: must lie in [0, 1) (0: no average)")
        at_least(self, ("ema_every",), 1)


class Ema:
    """The average of `module`'s weights and buffers, in fp32, and what the loop asks of it (train.Lever): an update
    after every optimizer step it falls on, and its accuracy when the run validates. A checkpoint component."""

    def __init__(self, module: torch.nn.Module, decay: float, every: int, precision: str):
        # Imported here: timm costs every process about a second of imports, and only --ema-decay uses it.
        from timm.utils import ModelEmaV3

        self.every, self.precision = every, precision
        self.average = ModelEmaV3(module, decay=decay**every, dtype=torch.float32)
        self.updates = 0

    def after_step(self, engine) -> None:
        """Fold the weights in every `every` optimizer steps (a collective: rank 0's buffers on every rank)."""
        if engine.global_steps % self.every:
            return
        with distributed.rank0_buffers(engine.module):
            if not self.updates:
                # The average starts from the weights it first sees: a fresh run's, or those of a resumed checkpoint
                # that held no average.
                self.average.set(engine.module)
            self.average.update(engine.module)
        self.updates += 1

    def validated(self, data, device: torch.device, flip: bool) -> dict:
        """Top-1 and top-5 of the average, computed in the run's precision as the raw weights are (epoch row keys)."""
        model = InPrecision(copy.deepcopy(self.average.module), self.precision, device.type).eval()
        top1, top5, _ = validate(model, data.validation(), device, flip)
        return {"val_top1_ema": top1, "val_top5_ema": top5}

    def state_dict(self) -> dict:
        return {"module": self.average.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.average.module.load_state_dict(state["module"])
        self.updates = state["updates"]
