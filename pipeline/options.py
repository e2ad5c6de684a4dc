"""What every section of the run options shares: fields whose flag is not their name, range checks, flag names.
Each section lives with the component it configures (pipeline/data/reader.py, engine.py, checkpoint.py,
tracking.py, distributed.py); pipeline/config.py composes them."""

from __future__ import annotations

import dataclasses


def flag_field(default, flag: str):
    """A field whose command-line flag is not its name with dashes."""
    return dataclasses.field(default=default, metadata={"flag": flag})


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of an option field."""
    if "flag" in f.metadata:
        return f.metadata["flag"]
    return "--deepspeed_config" if f.name == "deepspeed_config" else "--" + f.name.replace("_", "-")


def flag(section, name: str) -> str:
    """The command-line flag of a section's field."""
    return flag_of(next(f for f in dataclasses.fields(section) if f.name == name))


def at_least(section, names: tuple[str, ...], low: int) -> None:
    """Refuse (ValueError naming the flag) any of the section's `names` below `low`."""
    for name in names:
        if getattr(section, name) < low:
            rule = "must be at least 1" if low == 1 else "must not be negative"
            raise ValueError(f"{flag(section, name)} {getattr(section, name)}: {rule}")
