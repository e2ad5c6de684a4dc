"""Where metrics go: sinks behind one small interface, chosen once per run (`open_sinks`).

A sink takes per-step rows, epoch rows, the summary and the run's notes: `JsonlSink` (metrics.jsonl, one line per
epoch, and steps.jsonl, one per optimizer step), `WandbSink`, `ProgressSink` (the progress bar and the notes on
the console); the tests add one that keeps what it is told. Rank 0 gets its sinks; every other rank gets none, so
the training loop never asks which rank it is on.
"""

from __future__ import annotations

import json
import netrc
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline.options import at_least

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
WANDB_ENV = {
    "mode": "WANDB_MODE",
    "project": "WANDB_PROJECT",
    "group": "WANDB_RUN_GROUP",
    "name": "WANDB_NAME",
    "tags": "WANDB_TAGS",
    "dir": "WANDB_DIR",
    "id": "WANDB_RUN_ID",
    "job_type": "WANDB_JOB_TYPE",
}


def wandb_init_args(flags: dict, defaults: dict) -> dict:
    """wandb.init's keyword arguments: each flag that is given, else our default unless wandb's own environment
    variable for it is set (then wandb reads the variable itself)."""
    args = {k: v for k, v in flags.items() if v is not None}
    for key, value in defaults.items():
        if key not in args and not os.environ.get(WANDB_ENV.get(key, "")):
            args[key] = value
    return args


class Sink:
    """What the training loop tells a metric sink; each method does nothing unless a sink overrides it."""

    def progress(self, total: int, epoch: int, initial: int, run_total: int) -> None:
        """An epoch's training starts: `total` steps, `initial` of them done; `run_total` is the run's last step."""

    def steps(self, rows: list[dict]) -> None:
        """Per-step rows since the last report, each with its `step`."""

    def epoch(self, row: dict, step: int) -> None:
        """An epoch's row (at optimizer step `step`)."""

    def summary(self, row: dict) -> None:
        """The run's final row (or the fault that ended it)."""

    def note(self, line: str) -> None:
        """A line for the person watching the run."""

    def close(self) -> None:
        """The run is over."""


class JsonlSink(Sink):
    """metrics.jsonl (epoch rows, then the summary) and steps.jsonl (step rows) in the run folder."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir

    def _append(self, name: str, rows: list[dict]) -> None:
        with open(self.out_dir / name, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)

    def steps(self, rows: list[dict]) -> None:
        if rows:
            self._append(STEPS, rows)

    def epoch(self, row: dict, step: int) -> None:
        self._append(METRICS, [row])

    def summary(self, row: dict) -> None:
        self._append(METRICS, [row])


class WandbSink(Sink):
    """One wandb run per run folder: step rows under train/, epoch rows under epoch/, the summary as its summary.
    `args` are wandb.init's arguments; a resumed run continues the same wandb run (unless WANDB_RUN_ID says which)."""

    def __init__(self, out_dir: Path, args: dict, config: dict):
        import wandb  # imported lazily: a run with wandb disabled never loads it

        if "id" in args:
            id_file = out_dir / "wandb-id.txt"
            args["id"] = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
            id_file.write_text(args["id"])
        self.run = wandb.init(config=config, resume="allow", **args)

    @property
    def files(self) -> Path:
        """Where this run's wandb files are."""
        return Path(self.run.settings.sync_dir)

    def steps(self, rows: list[dict]) -> None:
        for row in rows:
            self.run.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])

    def epoch(self, row: dict, step: int) -> None:
        self.run.log({f"epoch/{k}": v for k, v in row.items()}, step=step)

    def summary(self, row: dict) -> None:
        self.run.summary.update(row)

    def close(self) -> None:
        import wandb

        self.run.finish()
        # Its service process ends with the run, not when it notices that this one is gone (ending.end_process skips
        # the interpreter's exit hooks, wandb's among them).
        wandb.teardown()


class ProgressSink(Sink):
    """The console: a progress bar per epoch (loss, lr, loss scale, images/s, the run's ETA) and the notes."""

    def __init__(self):
        self.bar, self.run_total = None, 0

    def progress(self, total: int, epoch: int, initial: int, run_total: int) -> None:
        self.run_total = run_total
        self.bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch}", unit="step", dynamic_ncols=True)

    def steps(self, rows: list[dict]) -> None:
        if self.bar is None or not rows:
            return
        last = rows[-1]
        per_step = sum(r["step_s"] for r in rows) / len(rows)
        self.bar.set_postfix(
            loss=f"{last['loss']:.3f}",
            lr=f"{last['lr']:.4g}",
            scale=f"{last['loss_scale']:g}",
            img_s=f"{last['images_per_sec']:.0f}",
            run_eta=tqdm.format_interval(max(self.run_total - last["step"], 0) * per_step),
            refresh=False,
        )
        self.bar.update(len(rows))

    def epoch(self, row: dict, step: int) -> None:
        self.close()

    def summary(self, row: dict) -> None:
        # The run's last line (a fault's error line on stderr, or the done line) starts a line of its own.
        self.close()

    def note(self, line: str) -> None:
        print(line, flush=True)

    def close(self) -> None:
        """Close an open progress bar (a run cut short leaves one)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Sinks:
    """The run's sinks as one: each call goes to every sink (none on ranks other than 0)."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    @property
    def wandb_dir(self) -> Path | None:
        """Where the run's wandb files are (None without wandb)."""
        return next((s.files for s in self.sinks if isinstance(s, WandbSink)), None)

    def progress(self, total: int, epoch: int, initial: int = 0, run_total: int = 0) -> None:
        for s in self.sinks:
            s.progress(total, epoch, initial, run_total)

    def steps(self, rows: list[dict]) -> None:
        for s in self.sinks:
            s.steps(rows)

    def epoch(self, row: dict, step: int) -> None:
        for s in self.sinks:
            s.epoch(row, step)

    def summary(self, row: dict) -> None:
        for s in self.sinks:
            s.summary(row)

    def note(self, line: str) -> None:
        for s in self.sinks:
            s.note(line)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def open_sinks(out_dir: Path, rank: int, wandb_args: dict | None, config: dict, progress: bool = True) -> Sinks:
    """The run's sinks, chosen once: on rank 0 the JSONL files, wandb unless `wandb_args` is None, and the console
    unless `progress` is False; none on other ranks."""
    if rank != 0:
        return Sinks([])
    sinks: list[Sink] = [JsonlSink(out_dir)]
    if wandb_args is not None:
        sinks.append(WandbSink(out_dir, wandb_args, config))
    if progress:
        sinks.append(ProgressSink())
    return Sinks(sinks)


def run_names(keys: dict) -> dict:
    """A run's name, group and tags in wandb, from its flat keys (train.run_keys), so that a project dashboard
    compares runs by arch, global batch, precision and rank count as they come in."""
    arch, batch, precision = keys["arch"], keys["global_batch"], keys["precision"]
    ranks = f"{keys['world_size']}x{keys['device']}"
    return {
        "name": f"{arch} B={batch} {precision} {ranks}",
        "group": f"{arch} B={batch}",
        "tags": [arch, f"B={batch}", precision, ranks],
    }


def open_run_sinks(options: TrackingOptions, out: Path, rank: int, keys: dict, sections: dict) -> Sinks:
    """A training run's metric sinks, active on rank 0 only, its config the flat keys beside the full sections.
    wandb: a flag wins, then wandb's own environment variables, then ours."""
    mode, wandb_args = wandb_mode(options.wandb_mode), None
    if mode != "disabled":
        flags = {"mode": options.wandb_mode, "project": options.wandb_project, "group": options.wandb_group}
        defaults = {
            "mode": mode,
            "project": PROJECT,
            **run_names(keys),
            "dir": str(out),
            "id": None,
            "job_type": "train",
        }
        wandb_args = wandb_init_args(flags, defaults)
    return open_sinks(out, rank, wandb_args, {**keys, **sections})


def exposed_key(env: dict | None = None, folders: tuple[Path, ...] | None = None) -> str | None:
    """A note when the wandb key this run has (WANDB_API_KEY) shows in `ps`: on the command line of a process this
    one descends from (DeepSpeed's launchers write .deepspeed_env's lines onto their command lines: pdsh's
    `export K=V;`, srun's --export, mpirun's -x), or set in a .deepspeed_env in the home or working folder."""
    env = os.environ if env is None else env
    key = env.get("WANDB_API_KEY")
    if not key:
        return None
    where = next((f"the command line of {name} (pid {pid})" for pid, name, line in _ancestors() if key in line), None)
    name = env.get("DS_ENV_FILE", ".deepspeed_env")
    for folder in folders or (Path.home(), Path.cwd()):
        path = folder / name
        names = [line.split("=")[0].strip() for line in path.read_text().splitlines()] if path.is_file() else []
        if where is None and "WANDB_API_KEY" in names:
            where = f"{path}, whose lines DeepSpeed's launchers put on every node's command line"
    if where is None:
        return None
    return (
        f"WANDB_API_KEY is in {where}: ps shows the key there to every user of the machine; log in with `wandb "
        "login` instead (a shared home), or put NETRC=<a netrc file only you can read> in .deepspeed_env "
        "(docs/multinode.md)"
    )


def _ancestors() -> list[tuple[int, str, str]]:
    """(pid, name, command line) of every process this one descends from (Linux /proc; none elsewhere)."""
    found, pid = [], os.getppid()
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            line = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            break
        found.append((pid, stat[stat.index("(") + 1 : stat.rindex(")")], line))
        pid = int(stat[stat.rindex(")") + 2 :].split()[1])
    return found


WANDB_MODES = ("online", "offline", "disabled")


@dataclass(frozen=True)
class TrackingOptions:
    """What the run measures and where it reports it."""

    # Validate every this many epochs (and always after the last).
    eval_every: int = 1
    # Validate each image and its mirror image, their logits summed (test-time augmentation, as FFCV's recipes).
    val_flip: bool = False
    # Steps between progress and wandb updates (each one is a host-device sync).
    log_every: int = 20
    # wandb: online, offline or disabled (default: WANDB_MODE, else online with an API key and offline without).
    wandb_mode: str | None = None
    # wandb project (default: WANDB_PROJECT, else imagenet-pipeline); the flag wins over the variable.
    wandb_project: str | None = None
    # wandb group (default: WANDB_RUN_GROUP, else "<arch> B=<batch>"); the flag wins over the variable.
    wandb_group: str | None = None

    def __post_init__(self):
        if self.wandb_mode is not None and self.wandb_mode not in WANDB_MODES:
            raise ValueError(f"--wandb-mode {self.wandb_mode}: use one of {', '.join(WANDB_MODES)}")
        at_least(self, ("eval_every", "log_every"), 1)
