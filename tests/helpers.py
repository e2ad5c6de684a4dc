"""What several test files share, in one module (test files import from here, never from each other):

- paths, small-run flags, the train.py and `python -m` command lines, and run outputs;
- small models and reference images;
- small TFRecord shard sets whose every pixel and label is known, written the way third parties write them;
- what wandb wrote in offline mode: the records of a run's `.wandb` file (a W&B header, then a LevelDB-style log
  of 32 KiB blocks of records, each a 7-byte header (CRC-32, length, type) and a chunk of a protobuf `Record`).
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import checkpoint, scaling
from pipeline.distributed import without_launcher
from pipeline.format import example, tfrecord
from tests import procs

# Small pictures keep the suite fast; the code paths are the same as for full-size photos.
TREE = dict(classes=6, train_per_class=30, val_per_class=7, min_side=32, max_side=72, quirks=True)
ROOT = Path(__file__).parent.parent
TRAIN = str(ROOT / "pipeline" / "train.py")
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="shows what a host without usable CUDA does")
SMALL = ["--arch", "resnet18", "--crop-size", "32", "--val-resize", "36", "--data-threads", "1"]
# Runs in 16 bits: on a CPU without native bf16 or fp16 (AVX2) 16-bit kernels are emulated, and ResNet-18 takes 3 s
# per 16 images even at 32 px; ShuffleNet V2 x0.5 takes 0.2 s.
SMALL_16BIT = ["--arch", "shufflenet_v2_x0_5", "--crop-size", "32", "--val-resize", "36", "--data-threads", "1"]


def train_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python pipeline/train.py args` as a user would (one process, no launcher variables)."""
    clean = without_launcher(os.environ)
    proc = procs.run(
        [sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=600, env={**clean, **(env or {})}
    )
    return proc


def ok(proc: subprocess.CompletedProcess) -> str:
    """stdout of a run that must have succeeded."""
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def metrics(out: Path) -> tuple[list[dict], dict]:
    """The epoch lines and the summary line of metrics.jsonl."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "summary" not in x], lines[-1]


def ds_file(folder: Path, batch: int, micro: int, precision: str) -> str:
    """A DeepSpeed configuration from the linear scaling rule, for small test batches."""
    path = folder / f"b{batch}-{micro}-{precision}.json"
    path.write_text(scaling.render(scaling.ds_config(scaling.Recipe(batch, micro, precision, fused=False))))
    return str(path)


def weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    """The model state DeepSpeed saved at `step`."""
    states = torch.load(out / "checkpoints" / checkpoint.tag(step) / "mp_rank_00_model_states.pt", weights_only=False)
    return states["module"]


def small_convnet() -> torch.nn.Module:
    """Conv, BN, ReLU, pooling and a linear layer: every parameter kind a ResNet has."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3),
    )  # fmt: skip


def reference_val(data: bytes, resize: int, crop: int) -> np.ndarray:
    """Resize the shorter side (bilinear, antialiased, size rounded) and take the center crop, with Pillow."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    scale = resize / min(w, h)
    size = (resize, int(h * scale + 0.5)) if w <= h else (int(w * scale + 0.5), resize)
    image = image.resize(size, Image.BILINEAR)
    left, top = int((size[0] - crop) / 2 + 0.5), int((size[1] - crop) / 2 + 0.5)
    return np.asarray(image.crop((left, top, left + crop, top + crop)))


# ---- commands and shard files ----


def run_module(module: str, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m module args...` as a user would, capturing its output (without this process's rendezvous
    variables: a test's own process group is not the command's)."""
    proc = procs.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=600,
                          env=without_launcher(os.environ))  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_shard(path: Path) -> list[dict]:
    """Every record of a shard, decoded into {feature: first value}."""
    with open(path, "rb") as f:
        return [{k: v[0] for k, v in example.decode(r.data).items()} for r in tfrecord.read_records(f, str(path))]


def shards_of(folder: Path, split: str) -> list[Path]:
    """The shard files of one split, in order."""
    return sorted(p for p in folder.glob(f"{split}-*") if not p.name.endswith(".idx"))


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """{relative path: content} of every file under a folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- shard sets ----


def colour_of(label: int) -> tuple[int, int, int]:
    """A distinct colour per label (up to 64), at least 64 levels from any other in some channel."""
    return (32 + 64 * (label % 4), 32 + 64 * (label // 4 % 4), 32 + 64 * (label // 16 % 4))


def jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of an (H, W, 3) uint8 array."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=quality)
    return out.getvalue()


def solid(label: int, width: int, height: int) -> bytes:
    """A JPEG of one colour: the colour of its label."""
    return jpeg(np.full((height, width, 3), colour_of(label), np.uint8))


def gradients(width: int, height: int) -> np.ndarray:
    """Red rises 0..255 left to right, green top to bottom: any crop shows where it came from."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8)


def smooth(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth picture without hard edges, so resampling differences stay small."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [
        127 + 100 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * xx + rng.uniform(0.5, 2) * yy + rng.uniform()))
        for _ in range(3)
    ]
    return np.stack(channels, -1).round().astype(np.uint8)


def _size(data: bytes) -> tuple[int, int]:
    """(height, width) of an image, or (0, 0) for bytes that are not one (broken records on purpose)."""
    try:
        return Image.open(io.BytesIO(data)).size[::-1]
    except OSError:
        return 0, 0


def write_shards(
    folder: Path, split: str, images: list[tuple[bytes, int]], shards: int, index: bool = True
) -> list[Path]:
    """Write (JPEG, label) records into `shards` files in the given order, with DALI indexes if asked."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, part in enumerate(np.array_split(np.arange(len(images)), shards)):
        path = folder / f"{split}-{s:05d}-of-{shards:05d}"
        offset, lines = 0, []
        with open(path, "wb") as f:
            for i in part:
                data, label = images[i]
                h, w = _size(data)
                record = tfrecord.frame(
                    example.image_example(data, label, f"n{label:08d}", f"{split}_{i}.JPEG", h, w, 3, "RGB")
                )
                f.write(record)
                lines.append(tfrecord.index_line(offset, len(record)))
                offset += len(record)
        if index:
            path.with_name(path.name + ".idx").write_text("".join(lines))
        paths.append(path)
    return paths


def write_manifest(folder: Path, num_classes: int, counts: dict[str, int], label_base: int = 1) -> None:
    """The parts of data_prep's manifest.json the reader uses."""
    splits = {split: {"images": n} for split, n in counts.items()}
    (folder / "manifest.json").write_text(
        json.dumps({"label_base": label_base, "num_classes": num_classes, "splits": splits})
    )


def labelled_set(folder: Path, train: int = 45, val: int = 21, shards: tuple[int, int] = (4, 3)) -> Path:
    """Solid-colour images with one distinct label each (1-based, like TF), a manifest and labels.txt."""
    rng = np.random.default_rng(3)
    sizes = lambda: (int(rng.integers(40, 90)), int(rng.integers(40, 90)))  # noqa: E731
    write_shards(folder, "train", [(solid(k, *sizes()), k + 1) for k in range(train)], shards[0])
    write_shards(folder, "validation", [(solid(k, *sizes()), k + 1) for k in range(val)], shards[1])
    write_manifest(folder, 64, {"train": train, "validation": val})
    (folder / "labels.txt").write_text("".join(f"n{k + 1:08d}\n" for k in range(64)))
    return folder


# ---- wandb's offline files ----

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    """Every record of a .wandb file, in order (wandb_internal_pb2.Record)."""
    # Imported here: the GPU image has no wandb, and the gpu tests use these helpers too.
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, chunks, out = HEADER, b"", []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the rest of a block too short for a header is padding
            pos += left
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        chunks += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            out.append(record)
            chunks = b""
    return out


def run_file(out_dir: Path) -> Path:
    """The one offline run file under a run folder."""
    (found,) = out_dir.glob("wandb/offline-run-*/run-*.wandb")
    return found


def logged(out_dir: Path) -> dict:
    """{"run": {project, name, group, tags, job_type}, "config": {...}, "history": [{key: value}], "summary": {...}}
    of the one run under `out_dir` (its wandb/ folder)."""
    config, history, summary, run = {}, [], {}, {}
    for r in records(run_file(out_dir)):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = {"project": r.run.project, "name": r.run.display_name, "group": r.run.run_group,
                   "tags": list(r.run.tags), "job_type": r.run.job_type, "id": r.run.run_id}  # fmt: skip
        if kind in ("config", "run"):
            updates = r.config.update if kind == "config" else r.run.config.update
            config.update({i.key: json.loads(i.value_json) for i in updates})
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
    return {"run": run, "config": config, "history": history, "summary": summary}


RUN_SH = ROOT / "bench" / "gpu" / "run.sh"


def run_sh(tmp_path, *steps: str, script: Path = RUN_SH, site: Path | None = None) -> subprocess.CompletedProcess:
    """bench/gpu/run.sh with this venv's Python, its libraries counted as installed, results under tmp_path."""
    if site is None:
        site = tmp_path / "site"
        site.mkdir(exist_ok=True)
        (site / ".installed").touch()
    env = {**os.environ, "PYTHON": sys.executable, "SITE": str(site), "OUT": str(tmp_path / "out"),
           "RESULTS": str(tmp_path / "results")}  # fmt: skip
    return procs.run(["bash", str(script), *steps], capture_output=True, text=True, env=env, timeout=600)
