"""Run options: a YAML file (`--config`) overridden by the command line, validated before any heavy work. The
sections live with their components (data/reader.py, deepspeed_json.py, engine.py, schedule.py, loss_scale.py,
ema.py, checkpoint.py, tracking.py, distributed.py); this module composes them.

The resolved options are written to `<out_dir>/config.yaml`, so a run folder says how it was made.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import simple_parsing
import yaml

from pipeline import options
from pipeline.checkpoint import CheckpointOptions
from pipeline.data.reader import DataOptions
from pipeline.deepspeed_json import DeepSpeedOptions
from pipeline.distributed import ClusterOptions
from pipeline.ema import EmaOptions
from pipeline.engine import ModelOptions
from pipeline.loss_scale import LossScaleOptions
from pipeline.options import flag_of
from pipeline.schedule import ScheduleOptions
from pipeline.tracking import TrackingOptions


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run is asked to do, apart from the DeepSpeed configuration: one section per component,
    each validated by itself. Flags and YAML keys are the sections' field names (flat; YAML may also nest them
    under the section names)."""

    data: DataOptions
    deepspeed: DeepSpeedOptions
    model: ModelOptions = ModelOptions()
    schedule: ScheduleOptions = ScheduleOptions()
    loss_scale: LossScaleOptions = LossScaleOptions()
    ema: EmaOptions = EmaOptions()
    checkpoint: CheckpointOptions = CheckpointOptions()
    tracking: TrackingOptions = TrackingOptions()
    cluster: ClusterOptions = ClusterOptions()

    @classmethod
    def from_options(cls, options: dict) -> RunConfig:
        """Sections from flat `name: value` options (or section mappings), each section validated once."""
        flat = _spread(options)
        unknown = sorted(set(flat) - {f.name for f in option_fields()})
        if unknown:
            raise ValueError(f"run options: unknown option {unknown[0]!r}")
        return cls(**{section: SECTIONS[section](**values) for section, values in by_section(flat).items()})

    def dump(self, path: Path, **extra) -> None:
        """Write the options, by section (and extra sections such as the derived schedule), as YAML."""
        path.write_text(yaml.safe_dump({"run": dataclasses.asdict(self), **extra}, sort_keys=False))


SECTIONS = {
    "data": DataOptions,
    "deepspeed": DeepSpeedOptions,
    "model": ModelOptions,
    "schedule": ScheduleOptions,
    "loss_scale": LossScaleOptions,
    "ema": EmaOptions,
    "checkpoint": CheckpointOptions,
    "tracking": TrackingOptions,
    "cluster": ClusterOptions,
}


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


def by_section(flat: dict) -> dict[str, dict]:
    """Known flat `name: value` options grouped by the section each belongs to (every section, maybe empty)."""
    owner = {f.name: section for section, kind in SECTIONS.items() for f in fields(kind)}
    parts = {section: {} for section in SECTIONS}
    for key, value in flat.items():
        parts[owner[key]][key] = value
    return parts


def parser() -> simple_parsing.ArgumentParser:
    """Flags for every field of every section (pipeline.options.parser), and what DeepSpeed's launcher passes."""
    p = options.parser("pipeline/train.py", "Train an ImageNet classifier with DeepSpeed.", SECTIONS)
    p.add_argument(
        "--config", metavar="YAML", help="YAML file of run options (keys as the flags, - or _); flags override it"
    )
    # DeepSpeed's launcher appends --local_rank=N to every rank's command line; `deepspeed.add_config_arguments`
    # declares --deepspeed, which its examples pass.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument(
        "--deepspeed", dest="deepspeed_flag", action="store_true", help="accepted for DeepSpeed launcher compatibility"
    )
    return p


def _value_type(f: dataclasses.Field, hints: dict) -> type:
    """The type of a field's values: its annotation, or the one type of an `X | None`."""
    kinds = [k for k in typing.get_args(hints[f.name]) if k is not type(None)] or [hints[f.name]]
    if len(kinds) != 1 or kinds[0] not in (bool, int, float, str):
        raise TypeError(f"run option {f.name}: {hints[f.name]} is not a bool, int, float or str (or one | None)")
    return kinds[0]


def value_types() -> dict[str, type]:
    """Every option's value type, from the sections' annotations."""
    return {f.name: _value_type(f, typing.get_type_hints(kind)) for kind in SECTIONS.values() for f in fields(kind)}


def _from_yaml(path: str) -> dict:
    """Options from a YAML file by section, with unknown keys and values of the wrong type refused."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"--config {path}: cannot read it ({e})") from e
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of option: value")
    kinds = value_types()
    # A key is a field's name or its flag's, with - or _.
    alias = {flag_of(f).lstrip("-").replace("-", "_"): f.name for f in option_fields()}

    def name(key) -> str:
        key = str(key).replace("-", "_")
        return alias.get(key, key)

    options = _spread(values, name)
    unknown = sorted(set(options) - set(kinds))
    if unknown:
        raise ValueError(f"--config {path}: unknown option {unknown[0]!r}; known: {', '.join(sorted(kinds))}")
    for key, value in options.items():
        kind = kinds[key]
        if value is not None and not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
            raise ValueError(f"--config {path}: {key} {value!r} is not a {kind.__name__}")
    return options


def load(argv: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML file, then the flags; raises ValueError naming the bad value (a section's validation,
    run as the parser builds it)."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config")
    path = first.parse_known_args(argv)[0].config
    p = parser()
    p.set_defaults(**by_section(_from_yaml(path) if path else {}))
    parsed = p.parse_args(argv)
    return RunConfig(**{section: getattr(parsed, section) for section in SECTIONS})


def read_ds_config(path: str) -> dict:
    """A DeepSpeed JSON configuration, or a one-line error naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--deepspeed_config {path}: cannot read it as JSON ({e})") from e


def flags_table() -> str:
    """The markdown table of every flag, its default and its meaning, from the parser --help prints."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for action in parser().field_actions():
        default = action.default
        shown = "required" if default == "" else "none" if default is None else f"`{default}`"
        meaning = " ".join(action.help.replace(" (default: %(default)s)", "").replace("%%", "%").split())
        meaning = meaning.replace("|", "\\|")  # |w| inside a table cell
        spellings = sorted(action.option_strings, key=lambda s: (len(s), s))  # simple-parsing's come from a set
        rows.append(f"| {', '.join(f'`{s}`' for s in spellings)} | {shown} | {meaning} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(flags_table(), end="")
