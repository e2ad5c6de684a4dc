"""Where metrics go on rank 0: metrics.jsonl (one line per epoch), steps.jsonl (one per optimizer step), wandb,
and the progress bar.

Other ranks get a Tracker that does nothing, so the training loop never asks which rank it is on.
"""

from __future__ import annotations

import json
import netrc
import os
import secrets
from pathlib import Path

from tqdm import tqdm

METRICS, STEPS = "metrics.jsonl", "steps.jsonl"
# The wandb project when neither --wandb-project nor WANDB_PROJECT names one.
PROJECT = "imagenet-pipeline"


def wandb_mode(requested: str | None) -> str:
    """The mode asked for (flag, else WANDB_MODE), else online when an API key is configured (env or ~/.netrc) and
    offline otherwise."""
    if requested:
        return requested
    if os.environ.get("WANDB_MODE"):
        # wandb's own spelling: dryrun is offline, run is online.
        return {"dryrun": "offline", "run": "online"}.get(os.environ["WANDB_MODE"], os.environ["WANDB_MODE"])
    if os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1"):
        return "disabled"
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


# wandb.init's arguments and the environment variables wandb reads for each: a flag wins, then the variable
# (left for wandb to read), then this project's default.
WANDB_ENV = {"mode": "WANDB_MODE", "project": "WANDB_PROJECT", "group": "WANDB_RUN_GROUP", "name": "WANDB_NAME",
             "tags": "WANDB_TAGS", "dir": "WANDB_DIR", "id": "WANDB_RUN_ID", "job_type": "WANDB_JOB_TYPE"}  # fmt: skip


def wandb_init_args(flags: dict, defaults: dict) -> dict:
    """wandb.init's keyword arguments: each flag that is given, else our default unless wandb's own environment
    variable for it is set (then wandb reads the variable itself)."""
    args = {k: v for k, v in flags.items() if v is not None}
    for key, value in defaults.items():
        if key not in args and not os.environ.get(WANDB_ENV.get(key, "")):
            args[key] = value
    return args


class Tracker:
    """Metric sinks of rank 0; `active=False` makes every call a no-op. `wandb_args` are wandb.init's arguments
    (None: no wandb)."""

    def __init__(self, out_dir: Path, active: bool, wandb_args: dict | None, config: dict):
        self.out_dir, self.active, self.run, self.bar, self.run_total = out_dir, active, None, None, 0
        if not active or wandb_args is None:
            return
        import wandb  # imported lazily: a run with wandb disabled never loads it

        # One wandb run per run folder: a resumed run continues the same one (unless WANDB_RUN_ID says which).
        if "id" in wandb_args:
            id_file = out_dir / "wandb-id.txt"
            wandb_args["id"] = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
            id_file.write_text(wandb_args["id"])
        self.run = wandb.init(config=config, resume="allow", **wandb_args)

    @property
    def wandb_dir(self) -> Path | None:
        """Where this run's wandb files are (None without wandb)."""
        return Path(self.run.settings.sync_dir) if self.run is not None else None

    def progress(self, total: int, epoch: int, initial: int = 0, run_total: int = 0) -> None:
        """Open the progress bar of an epoch's training steps (its ETA is the epoch's); `run_total` is the last
        optimizer step of the run, for the run's ETA."""
        if self.active:
            self.run_total = run_total
            self.bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch}", unit="step", dynamic_ncols=True)

    def steps(self, rows: list[dict]) -> None:
        """Per-step metrics (each row holds its `step`) to steps.jsonl and wandb; the bar shows the last row."""
        if not self.active or not rows:
            return
        with open(self.out_dir / STEPS, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        if self.run is not None:
            for row in rows:
                self.run.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])
        if self.bar is not None:
            last = rows[-1]
            per_step = sum(r["step_s"] for r in rows) / len(rows)
            self.bar.set_postfix(
                loss=f"{last['loss']:.3f}", lr=f"{last['lr']:.4g}", scale=f"{last['loss_scale']:g}",
                img_s=f"{last['images_per_sec']:.0f}",
                run_eta=tqdm.format_interval(max(self.run_total - last["step"], 0) * per_step), refresh=False,
            )  # fmt: skip
            self.bar.update(len(rows))

    def epoch(self, row: dict, step: int) -> None:
        """One line of metrics.jsonl and the epoch's metrics in wandb."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        with open(self.out_dir / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.run is not None:
            self.run.log({f"epoch/{k}": v for k, v in row.items()}, step=step)

    def summary(self, row: dict) -> None:
        """The final line of metrics.jsonl, also the wandb run summary."""
        if not self.active:
            return
        with open(self.out_dir / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.run is not None:
            self.run.summary.update(row)

    def close(self) -> None:
        """Close an open progress bar (a run cut short leaves one) and finish the wandb run."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.run is not None:
            self.run.finish()
