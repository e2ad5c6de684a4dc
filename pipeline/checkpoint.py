"""DeepSpeed checkpoints that are only trusted once every rank has finished writing them.

Layout: `<out_dir>/checkpoints/step00001234/` holds DeepSpeed's files plus `complete.json`, which
rank 0 writes (atomically, after fsync) once a barrier shows every rank has written its part. A
folder without it (a crash mid-save) is never resumed from, never counts towards the checkpoints
kept, and is deleted once a later checkpoint is complete.

Beside DeepSpeed's own state (weights, optimizer, its loss scaler and scheduler, step counters), a checkpoint
holds the state of every component a run registers (`Components`: progress, loss scale, schedule, fault guard,
and whatever a run adds): the checkpoint saves what they hand it and hands it back on a resume, so the trainer
never lists what it saves (torchtitan's checkpointer). It also holds the model card (`model_card`), which
`complete.json` repeats for pipeline.evaluate and pipeline.export.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from pipeline.format.atomic import write_atomic
from pipeline.options import at_least

COMPLETE = "complete.json"
# DeepSpeed's file of the model weights (and client state) in a checkpoint folder, without model parallelism.
MODEL_STATES = "mp_rank_00_model_states.pt"


def tag(step: int) -> str:
    """The folder name of the checkpoint taken after `step` optimizer steps."""
    return f"step{step:08d}"


def _step(path: Path) -> int | None:
    """The step a checkpoint folder's complete.json records; None if there is none (or it was just pruned)."""
    try:
        return json.loads((path / COMPLETE).read_text())["step"]
    except FileNotFoundError:
        return None


def complete(folder: Path) -> list[Path]:
    """Complete checkpoints under `folder`, oldest first."""
    steps = {p: _step(p) for p in folder.glob("step*")} if folder.is_dir() else {}
    return sorted((p for p, step in steps.items() if step is not None), key=steps.get)


def incomplete(folder: Path, before: int) -> list[Path]:
    """Checkpoint folders of steps before `before` that never got `complete.json` (a crash mid-save)."""
    return [p for p in folder.glob("step*") if not (p / COMPLETE).is_file() and p.name < tag(before)]


class Stateful(Protocol):
    """What a component hands the checkpoint, and takes back on a resume."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


# A run's components, registered once by name: everything a resume must restore besides DeepSpeed's own state.
Components = dict[str, Stateful]


def model_card(
    arch: str,
    num_classes: int,
    classes: list[str],
    crop_size: int,
    val_resize: int,
    precision: str,
    batch_size: int,
    blurpool: bool = False,
    flip: bool = False,
) -> dict:
    """What a checkpoint's weights need to be used without their run: the model (blurred strided convolutions with
    `blurpool`), its classes, its input (the validation crop and resize, `flip`: with mirror images too), and what
    validation computed in with its batch per rank (pipeline.evaluate repeats them)."""
    return {
        "arch": arch,
        "num_classes": num_classes,
        "classes": list(classes),
        "crop_size": crop_size,
        "val_resize": val_resize,
        "precision": precision,
        "batch_size": batch_size,
        "blurpool": blurpool,
        "val_flip": flip,
    }


def save(engine, folder: Path, components: Components, card: dict, keep: int) -> Path:
    """Save on every rank (a collective): DeepSpeed's state, every component's and the model card; mark complete
    on rank 0 (complete.json: the step and the card), then drop the oldest beyond `keep`."""
    path = folder / tag(engine.global_steps)
    state = {"components": {name: c.state_dict() for name, c in components.items()}, "model": card}
    if dist.get_rank() == 0 and (path / COMPLETE).is_file():
        # Saving this step again (an epoch end that --save-every-steps also hit): it is incomplete until rewritten.
        (path / COMPLETE).unlink()
    dist.barrier()
    engine.save_checkpoint(str(folder), tag=path.name, client_state=state)
    dist.barrier()
    if dist.get_rank() == 0:
        write_atomic(path / COMPLETE, json.dumps({"step": engine.global_steps, "model": card}).encode())
        for old in complete(folder)[:-keep] + incomplete(folder, before=engine.global_steps):
            shutil.rmtree(old, ignore_errors=True)
        print(f"saved checkpoint {path} at step {engine.global_steps}", flush=True)
    dist.barrier()
    return path


def find(resume: str, folder: Path) -> Path | None:
    """The checkpoint `--resume` names: `auto` is the newest complete one (None if there is none yet)."""
    if resume == "auto":
        found = complete(folder)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise ValueError(
            f"--resume {resume}: not a complete checkpoint (no {COMPLETE}); use --resume auto or one of "
            f"{[str(p) for p in complete(path.parent)] or 'the step* folders under <out_dir>/checkpoints'}"
        )
    return path


def load(engine, path: Path, components: Components) -> list[str]:
    """Restore DeepSpeed's state (weights, optimizer, loss scaler, scheduler, step counters), then every component's
    (in the order they were registered); returns the components the checkpoint holds nothing for (they start
    afresh)."""
    loaded, state = engine.load_checkpoint(str(path.parent), tag=path.name)
    if loaded is None:
        raise ValueError(f"--resume {path}: DeepSpeed could not load it; use another checkpoint or start afresh")
    if "components" not in state:
        raise ValueError(
            f"--resume {path}: saved before checkpoints held their components' state; resume from a newer checkpoint "
            "or start afresh with a new --out-dir"
        )
    saved = state["components"]
    for name, component in components.items():
        if name in saved:
            try:
                component.load_state_dict(saved[name])
            except ValueError as e:
                raise ValueError(f"--resume {path}: {e}") from e
    if dist.get_rank() == 0:
        print(f"resumed from {path} at step {engine.global_steps}", flush=True)
    return [name for name in components if name not in saved]


@dataclass
class Checkpointer:
    """A run's checkpoints: the engine, the folder they go to, the components they hold besides DeepSpeed's state
    (registered once; a run may add more before it resumes), the model card, and how many are kept."""

    engine: object
    folder: Path
    components: Components
    card: dict
    keep: int

    def save(self) -> Path:
        """Checkpoint now (a collective: every rank calls it at the same step)."""
        return save(self.engine, self.folder, self.components, self.card, self.keep)

    def resume(self, resume: str | None) -> list[str]:
        """Continue from --resume's checkpoint, if any: DeepSpeed's state and every component's; returns a note for
        each component the checkpoint holds nothing for (it starts afresh)."""
        if not resume:
            return []
        path = find(resume, self.folder)
        if path is None:
            if dist.get_rank() == 0:
                print(f"--resume auto: no complete checkpoint in {self.folder} yet; starting afresh")
            return []
        fresh = load(self.engine, path, self.components)
        return [f"--resume {path}: it holds no {name} state; {name} starts afresh" for name in fresh]


def resolve(path: str) -> Path:
    """A complete checkpoint: `path` itself, or the newest complete one of the run folder `path`."""
    folder = Path(path)
    if (folder / COMPLETE).is_file():
        return folder
    found = complete(folder / "checkpoints")
    if found:
        return found[-1]
    raise ValueError(
        f"{path}: neither a complete checkpoint (no {COMPLETE}) nor a run folder with complete checkpoints in "
        "checkpoints/; pass a run's --out-dir or one of its checkpoints/step* folders"
    )


def card(path: Path) -> dict:
    """The model card a checkpoint was saved with (arch, num_classes, classes, crop_size, val_resize) and its step,
    from complete.json (JSON: nothing is unpickled)."""
    state = json.loads((path / COMPLETE).read_text())
    if "model" not in state:
        raise ValueError(
            f"{path}: saved before checkpoints recorded their model (arch, classes); resume the run for one more "
            "step (--resume auto --max-steps N+1) to save a checkpoint that does"
        )
    return {**state["model"], "step": state["step"]}


def weights(path: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The model's weights from a checkpoint (with `ema`: their average, pipeline.ema): torchvision's keys (and
    BlurPoolConv2d's `.conv` where the card says blurpool), floating tensors in fp32, plain NCHW memory. DeepSpeed's
    file is unpickled (torch.load with weights_only=False): a checkpoint is trusted code."""
    states = torch.load(path / MODEL_STATES, map_location="cpu", weights_only=False)
    if ema:
        average = states.get("components", {}).get("ema")
        if average is None:
            raise ValueError(f"--ema: {path} holds no average of the weights (its run had no --ema-decay)")
        module = average["module"]
    else:
        module = states["module"]
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in module.items()}


@dataclass(frozen=True)
class CheckpointOptions:
    """Where the run's files go, and when it checkpoints and resumes."""

    # Run folder: config, metrics.jsonl, checkpoints/, wandb/.
    out_dir: str = "runs/default"
    # Checkpoint at the end of every this many epochs (and always after the last).
    save_every_epochs: int = 1
    # Also checkpoint every this many optimizer steps (0: only at epoch ends).
    save_every_steps: int = 0
    # Complete checkpoints kept; older ones are deleted once a newer one is complete.
    keep_checkpoints: int = 3
    # auto: continue from the newest complete checkpoint in out_dir if any; or a checkpoint folder. A checkpoint is
    # trusted code: DeepSpeed's files are unpickled when loaded, so resume only from checkpoints you trust.
    resume: str | None = None

    def __post_init__(self):
        at_least(self, ("save_every_epochs", "keep_checkpoints"), 1)
        at_least(self, ("save_every_steps",), 0)
