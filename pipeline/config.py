"""Run options: a YAML file (`--config`) overridden by the command line, validated before any heavy work.

The resolved options are written to `<out_dir>/config.yaml`, so a run folder says how it was made.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from pipeline.scaling import REFERENCE_BATCH, REFERENCE_LR
from pipeline.schedule import SCHEDULES

WANDB_MODES = ("online", "offline", "disabled")
OPTIMIZERS = ("sgd", "lars")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
# torch.compile modes (DeepSpeed's engine.compile); reduce-overhead also captures CUDA graphs.
COMPILE_MODES = ("none", "default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")


# Goyal et al.: 5 epochs of gradual warmup in a 90-epoch run.
WARMUP_EPOCHS, RECIPE_EPOCHS = 5.0, 90


def default_warmup_epochs(epochs: int) -> float:
    """The recipe's warmup for a run of `epochs`: 5 epochs at 90 or more, the same share of a shorter run."""
    return WARMUP_EPOCHS * min(1.0, epochs / RECIPE_EPOCHS)


def _flag_field(default, flag: str):
    """A field whose command-line flag is not its name with dashes."""
    return dataclasses.field(default=default, metadata={"flag": flag})


def _at_least(section, names: tuple[str, ...], low: int) -> None:
    for name in names:
        if getattr(section, name) < low:
            rule = "must be at least 1" if low == 1 else "must not be negative"
            raise ValueError(f"{_flag(section, name)} {getattr(section, name)}: {rule}")


@dataclass(frozen=True)
class DataOptions:
    """What to read and how to augment it (pipeline.data.DataConfig adds what the run derives: batch, dtype,
    layout)."""

    # Folder of train-*/validation-* TFRecord shards (make prep-imagenet).
    data_dir: str = ""
    # Side of the square training and validation crops.
    crop_size: int = 224
    # Validation: resize the shorter side to this, then center-crop `crop_size`.
    val_resize: int = 256
    # Where decoding runs: auto (the GPU when there is one), gpu or cpu.
    device: str = _flag_field("auto", "--data-device")
    # DALI CPU threads per rank (0: this host's cores divided by its ranks, at most 4 when decoding on a GPU).
    num_threads: int = _flag_field(0, "--data-threads")
    # Base seed of data order, augmentation and the initial weights.
    seed: int = 0
    # Class count of shards without manifest.json (their labels are 1-based, TF style; default 1000).
    num_classes: int | None = None
    # Where missing indexes go when the data folder is read-only (default: under ~/.cache).
    index_dir: str | None = None
    # Share of JPEGs for the GPU's hardware JPEG decoder, 0..1 (default: chosen per GPU model in augment.py).
    hw_decoder_load: float | None = None
    # Batches DALI prepares ahead of the model (its prefetch queue depth).
    prefetch: int = _flag_field(2, "--data-prefetch")
    # Samples each rank's reader shuffles through (more mixes further, costs host memory).
    shuffle_buffer: int = 8192

    def __post_init__(self):
        if not self.data_dir:
            raise ValueError("--data-dir is required: the folder of train-*/validation-* shards")
        _at_least(self, ("crop_size", "prefetch", "shuffle_buffer"), 1)
        _at_least(self, ("seed", "num_threads"), 0)
        if self.val_resize < self.crop_size:
            raise ValueError(f"--val-resize {self.val_resize} is smaller than --crop-size {self.crop_size}")
        if self.device not in ("auto", "gpu", "cpu"):
            raise ValueError(f"--data-device {self.device}: use auto, gpu or cpu")
        if self.hw_decoder_load is not None and not 0 <= self.hw_decoder_load <= 1:
            raise ValueError(f"--hw-decoder-load {self.hw_decoder_load}: must lie in [0, 1]")


@dataclass(frozen=True)
class OptimOptions:
    """The model, the optimisation recipe and the precision and speed settings it runs with."""

    # DeepSpeed configuration (ds_configs/*.json): batch, precision, optimizer, scheduler.
    deepspeed_config: str = ""
    # Any torchvision classification model (torchvision.models.list_models()).
    arch: str = "resnet50"
    # Epochs to train; the schedule is laid out over exactly this many.
    epochs: int = 90
    # Label smoothing of the training loss (0.1 beyond 8k in Jia et al.; 0 in Goyal et al.).
    label_smoothing: float = 0.0
    # warmup_decay (DeepSpeed's WarmupDecayLR) or goyal_steps (x0.1 at epochs 30/60/80 of 90, scaled).
    schedule: str = "warmup_decay"
    # Epochs of linear warmup from 0.1 to 0.1*B/256 (default: Goyal et al.'s 5 of 90 epochs, scaled to shorter
    # --epochs: 5 x epochs / 90; a batch of 256 or less has nothing to warm up).
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
    # Run a GPU configuration (fp16, --data-device gpu) on a host where CUDA is not usable: fp16 trains in bf16,
    # decoding runs on the CPU. Without it such a run stops before any work, saying why CUDA is not usable.
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
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule {self.schedule}: use one of {', '.join(SCHEDULES)}")
        if self.epochs < 1:
            raise ValueError(f"--epochs {self.epochs}: must be at least 1")
        if self.warmup_epochs is None:
            object.__setattr__(self, "warmup_epochs", default_warmup_epochs(self.epochs))
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"--warmup-epochs {self.warmup_epochs}: must lie in [0, --epochs {self.epochs})")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"--label-smoothing {self.label_smoothing}: must lie in [0, 1)")
        _at_least(self, ("max_steps", "max_skipped_steps", "loss_scale_window"), 0)
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"--memory-format {self.memory_format}: use one of {', '.join(MEMORY_FORMATS)}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"--compile {self.compile}: use one of {', '.join(COMPILE_MODES)}")


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
        _at_least(self, ("save_every_epochs", "keep_checkpoints"), 1)
        _at_least(self, ("save_every_steps",), 0)


@dataclass(frozen=True)
class TrackingOptions:
    """What the run measures and where it reports it."""

    # Validate every this many epochs (and always after the last).
    eval_every: int = 1
    # Steps between progress and wandb updates (each one is a host-device sync).
    log_every: int = 20
    # wandb: online, offline or disabled (default: WANDB_MODE, else online with an API key and offline without).
    wandb_mode: str | None = None
    # wandb project (default: WANDB_PROJECT, else imagenet-pipeline) and group (default: WANDB_RUN_GROUP, else
    # "<arch> B=<batch>"); a flag wins over wandb's environment variables.
    wandb_project: str | None = None
    wandb_group: str | None = None

    def __post_init__(self):
        if self.wandb_mode is not None and self.wandb_mode not in WANDB_MODES:
            raise ValueError(f"--wandb-mode {self.wandb_mode}: use one of {', '.join(WANDB_MODES)}")
        _at_least(self, ("eval_every", "log_every"), 1)


@dataclass(frozen=True)
class ClusterOptions:
    """How the ranks wait for each other."""

    # Seconds a rank waits in a collective for its peers before giving up (a dead rank ends the others).
    dist_timeout: int = 600
    # Seconds the ranks wait for each other when the job starts (a host of the hostfile that never starts its
    # ranks ends the job after this, with one line).
    join_timeout: int = 300

    def __post_init__(self):
        _at_least(self, ("dist_timeout", "join_timeout"), 1)


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run is asked to do, apart from the DeepSpeed configuration: one section per component,
    each validated by itself. Flags and YAML keys are the sections' field names (flat; YAML may also nest them
    under the section names)."""

    data: DataOptions
    optim: OptimOptions
    checkpoint: CheckpointOptions = CheckpointOptions()
    tracking: TrackingOptions = TrackingOptions()
    cluster: ClusterOptions = ClusterOptions()

    @classmethod
    def from_options(cls, options: dict) -> RunConfig:
        """Sections from flat `name: value` options (or section mappings), each section validated once."""
        flat = _spread(options)
        owner = {f.name: section for section, kind in SECTIONS.items() for f in fields(kind)}
        unknown = sorted(set(flat) - set(owner))
        if unknown:
            raise ValueError(f"run options: unknown option {unknown[0]!r}")
        parts = {section: {} for section in SECTIONS}
        for key, value in flat.items():
            parts[owner[key]][key] = value
        return cls(**{section: SECTIONS[section](**values) for section, values in parts.items()})

    def dump(self, path: Path, **extra) -> None:
        """Write the options, by section (and extra sections such as the derived schedule), as YAML."""
        path.write_text(yaml.safe_dump({"run": dataclasses.asdict(self), **extra}, sort_keys=False))


SECTIONS = {"data": DataOptions, "optim": OptimOptions, "checkpoint": CheckpointOptions,
            "tracking": TrackingOptions, "cluster": ClusterOptions}  # fmt: skip


def _spread(options: dict, name=lambda key: key) -> dict:
    """Flat `name: value` options: a section written as a mapping of its options is spread out; keys go
    through `name`."""
    flat = {}
    for key, value in options.items():
        if name(key) in SECTIONS and isinstance(value, dict):
            flat.update({name(k): v for k, v in value.items()})
        else:
            flat[name(key)] = value
    return flat


def option_fields() -> list[dataclasses.Field]:
    """Every option of every section, in section order."""
    return [f for kind in SECTIONS.values() for f in fields(kind)]


def _flag(section, name: str) -> str:
    """The command-line flag of a section's field."""
    f = next(f for f in fields(section) if f.name == name)
    return flag_of(f)


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of an option field."""
    if "flag" in f.metadata:
        return f.metadata["flag"]
    return "--deepspeed_config" if f.name == "deepspeed_config" else "--" + f.name.replace("_", "-")


def parser() -> argparse.ArgumentParser:
    """Flags for every field; a flag not given leaves the YAML or default value alone."""
    p = argparse.ArgumentParser(prog="pipeline/train.py", description="Train an ImageNet classifier with DeepSpeed.")
    p.add_argument("--config", help="YAML file of run options (keys as the flags, - or _); flags override it")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("--deepspeed", action="store_true", help="accepted for DeepSpeed launcher compatibility")
    helps = field_help()
    for f in option_fields():
        default = "" if f.default in (None, "") else f" (default: {f.default})"
        text = helps.get(f.name, "") + default
        if _kind(f) is bool:
            # `--allow-cpu` alone means true; `--allow-cpu false` also parses.
            p.add_argument(flag_of(f), dest=f.name, type=_bool, nargs="?", const=True, default=argparse.SUPPRESS,
                           help=text)  # fmt: skip
        else:
            p.add_argument(flag_of(f), dest=f.name, type=_kind(f), default=argparse.SUPPRESS, help=text)
    return p


def field_help() -> dict[str, str]:
    """Each option's --help text: the comment above it in its section (fields declared together share one)."""
    helps, pending, current = {}, [], ""
    source = "\n".join(inspect.getsource(kind) for kind in SECTIONS.values())
    for line in source.splitlines():
        text = line.strip()
        if text.startswith("#"):
            pending.append(text.lstrip("# "))
        elif ":" in text and text.split(":")[0].isidentifier() and not text.startswith(("def ", "class ")):
            current, pending = (" ".join(pending), []) if pending else (current, pending)
            helps[text.split(":")[0]] = current
        else:
            pending = []
    return {k: v.replace("%", "%%") for k, v in helps.items()}


def _bool(text: str) -> bool:
    """A boolean flag's value: true/false, yes/no, 1/0."""
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return value


def _kind(f: dataclasses.Field) -> type:
    """The Python type of a field's values (annotations are strings here)."""
    return {"int": int, "int | None": int, "float": float, "float | None": float, "bool": bool}.get(f.type, str)


def _from_yaml(path: str) -> dict:
    """Options from a YAML file, with unknown keys refused."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"--config {path}: cannot read it ({e})") from e
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of option: value")
    known = {f.name for f in option_fields()}
    # A key is a field's name or its flag's (data_threads or num_threads), with - or _.
    alias = {flag_of(f).lstrip("-").replace("-", "_"): f.name for f in option_fields()}

    def name(key) -> str:
        key = str(key).replace("-", "_")
        return alias.get(key, key)

    options = _spread(values, name)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown option {unknown[0]!r}; known: {', '.join(sorted(known))}")
    for f in option_fields():
        value, kind = options.get(f.name), _kind(f)
        if value is not None and not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
            raise ValueError(f"--config {path}: {f.name} {value!r} is not a {kind.__name__}")
    return options


def load(argv: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML file, then the flags; raises ValueError naming the bad value."""
    args = vars(parser().parse_args(argv))
    options = _from_yaml(args["config"]) if args.get("config") else {}
    options.update({k: v for k, v in args.items() if k not in ("config", "local_rank", "deepspeed")})
    return RunConfig.from_options(options)


def read_ds_config(path: str) -> dict:
    """A DeepSpeed JSON configuration, or a one-line error naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--deepspeed_config {path}: cannot read it as JSON ({e})") from e
