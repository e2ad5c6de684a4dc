"""Run options: a YAML file (`--config`) overridden by the command line, validated before any heavy work. The
sections live with their components (data, engine, checkpoint, tracking, distributed); this module composes them.

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

from pipeline.checkpoint import CheckpointOptions
from pipeline.data.reader import DataOptions
from pipeline.distributed import ClusterOptions
from pipeline.engine import OptimOptions
from pipeline.options import flag_of
from pipeline.tracking import TrackingOptions


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


SECTIONS = {
    "data": DataOptions,
    "optim": OptimOptions,
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
            p.add_argument(
                flag_of(f), dest=f.name, type=_bool, nargs="?", const=True, default=argparse.SUPPRESS, help=text
            )
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


def flags_table() -> str:
    """The markdown table of every flag, its default and its meaning, from the same field comments as --help."""
    helps = {k: v.replace("%%", "%") for k, v in field_help().items()}
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for f in option_fields():
        default = "required" if f.default == "" else "none" if f.default is None else f"`{f.default}`"
        rows.append(f"| `{flag_of(f)}` | {default} | {helps.get(f.name, '')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(flags_table(), end="")
