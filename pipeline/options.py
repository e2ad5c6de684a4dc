"""What every section of the run options shares: the command-line parser, flag names, range checks. Each section
is a frozen dataclass living with the component it configures (pipeline/data/shards.py, data/reader.py, engine.py,
checkpoint.py, tracking.py, distributed.py); pipeline/config.py composes them for training, and the data tools
(python -m pipeline.data.shards, preview) take their flags from the same sections.

A section's fields are its flags: `--` and the field's name with dashes (a field may add a spelling with
`simple_parsing.field(alias=...)`), their help the comment above the field. simple-parsing reads both, so --help
and the docs' flag table (python -m pipeline.config) come from the dataclasses themselves.
"""

from __future__ import annotations

import argparse
import dataclasses

import simple_parsing
from simple_parsing import ArgumentGenerationMode, ConflictResolution, DashVariant


class ArgumentParser(simple_parsing.ArgumentParser):
    """simple-parsing's parser, whose help (and so the docs' flag table) shows the sections' flags before any parse:
    simple-parsing adds them only when it parses or prints help."""

    def format_help(self) -> str:
        self._preprocessing()
        return super().format_help()

    def field_actions(self) -> list[argparse.Action]:
        """The flags of the sections' fields, in section order (a field's destination is `<section>.<field>`)."""
        self._preprocessing()
        return [action for action in self._actions if "." in action.dest]


def parser(prog: str, description: str, sections: dict[str, type]) -> ArgumentParser:
    """Flags for every field of the `sections` (dataclasses, by the namespace attribute each is parsed into), all on
    one level: `--crop-size`, not `--data.crop-size`. Parsing builds each section, so its validation runs there."""
    p = ArgumentParser(
        prog=prog,
        description=description,
        add_option_string_dash_variants=DashVariant.DASH,
        argument_generation_mode=ArgumentGenerationMode.FLAT,
        # Two sections with a field of the same name would be two flags of one name: refused, not prefixed.
        conflict_resolution=ConflictResolution.NONE,
        add_config_path_arg=False,
    )
    for dest, kind in sections.items():
        p.add_arguments(kind, dest=dest)
    return p


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of an option field, as errors and the docs spell it: its alias where it has one
    (--deepspeed_config, as DeepSpeed's documentation writes it), else its name with dashes."""
    aliases = f.metadata.get("alias") or []
    return aliases[0] if aliases else "--" + f.name.replace("_", "-")


def flag(section, name: str) -> str:
    """The command-line flag of a section's field."""
    return flag_of(next(f for f in dataclasses.fields(section) if f.name == name))


def at_least(section, names: tuple[str, ...], low: int) -> None:
    """Refuse (ValueError naming the flag) any of the section's `names` below `low`."""
    for name in names:
        if getattr(section, name) < low:
            rule = "must be at least 1" if low == 1 else "must not be negative"
            raise ValueError(f"{flag(section, name)} {getattr(section, name)}: {rule}")
