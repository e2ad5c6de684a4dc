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


def wandb_mode(requested: str | None) -> str:
    """The mode asked for, else online when an API key is configured (env or ~/.netrc) and offline otherwise."""
    if requested:
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


class Tracker:
    """Metric sinks of rank 0; `active=False` makes every call a no-op."""

    def __init__(self, out_dir: Path, active: bool, mode: str, project: str, group: str | None, config: dict):
        self.out_dir, self.active, self.run, self.bar = out_dir, active, None, None
        if not active or mode == "disabled":
            return
        import wandb  # imported lazily: a run with wandb disabled never loads it

        # One wandb run per run folder: a resumed run continues the same one.
        id_file = out_dir / "wandb-id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=project, group=group, dir=str(out_dir), mode=mode, config=config, id=run_id, resume="allow"
        )

    def progress(self, total: int, epoch: int, initial: int = 0) -> None:
        """Open the progress bar of an epoch's training steps."""
        if self.active:
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
            self.bar.set_postfix(
                loss=f"{last['loss']:.3f}", lr=f"{last['lr']:.4g}", scale=f"{last['loss_scale']:g}",
                img_s=f"{last['images_per_sec']:.0f}", refresh=False,
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
