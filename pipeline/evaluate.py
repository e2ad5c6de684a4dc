"""Exact top-1 and top-5 of a trained checkpoint over the whole validation set, on any number of ranks.

    python -m pipeline.evaluate --checkpoint RUN_DIR|CHECKPOINT --data-dir DIR [--out result.json]
    torchrun --nproc_per_node 8 -m pipeline.evaluate --checkpoint RUN_DIR --data-dir DIR
    deepspeed --num_gpus 8 pipeline/evaluate.py --checkpoint RUN_DIR --data-dir DIR

The validation pipeline is training's (pipeline.data): resize the shorter side, center crop, normalise,
each image counted exactly once across the ranks. The model computes in the precision the run validated in
(recorded in the checkpoint), so its top-1 is the run's own; `--precision fp32` (or any mode) chooses
otherwise. Rank 0 prints the result and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from pipeline import checkpoint, deepspeed_json, distributed, ending, engine, launch
from pipeline.data import DataConfig, ImageNetData
from pipeline.data.reader import DECODE_DEVICES
from pipeline.data.shards import DataError, open_shards
from pipeline.meters import validate
from pipeline.model import build_model

TRUSTED = "it is unpickled, so evaluate only checkpoints you trust (pipeline.export writes a file that is not)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of `python -m pipeline.evaluate`."""
    p = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.split("\n")[0])
    p.add_argument(
        "--checkpoint",
        required=True,
        help=f"a run folder (its newest complete checkpoint) or a checkpoints/step* folder; {TRUSTED}",
    )
    p.add_argument("--data-dir", required=True, help="folder of the validation-* shards")
    p.add_argument("--out", help="result JSON (default: <run folder>/eval-<checkpoint>.json)")
    p.add_argument("--batch-size", type=int, default=0, help="images per rank per step (0: the run's micro-batch)")
    p.add_argument(
        "--precision",
        choices=tuple(deepspeed_json.DATA_DTYPES),
        help="what the model computes in (default: the precision the run validated in; fp32 for checkpoints that "
        "do not record it)",
    )
    p.add_argument("--ema", action="store_true", help="evaluate the average of the weights (runs with --ema-decay)")
    p.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        help="also the mirror images, logits summed (default: as the run validated, --val-flip)",
    )
    p.add_argument("--data-device", choices=DECODE_DEVICES, default="auto", help="where DALI decodes")
    p.add_argument("--data-threads", type=int, default=0, help="DALI CPU threads per rank (0: cores / ranks)")
    p.add_argument("--dist-timeout", type=int, default=600, help="seconds a rank waits for a peer in a collective")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    return p.parse_args(argv)


def load_model(path: Path, card: dict, device: torch.device, precision: str, ema: bool = False) -> torch.nn.Module:
    """The checkpoint's torchvision model (with BlurPool where the card says so; `ema`: the average of its weights)
    computing in `precision` (engine.InPrecision), in eval mode on `device` (channels-last on a GPU)."""
    model, _ = build_model(card["arch"], card["num_classes"], blurpool=card.get("blurpool", False))
    model.load_state_dict(checkpoint.weights(path, ema))
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    return engine.InPrecision(model, precision, device.type).eval()


def precision_of(card: dict, asked: str | None) -> tuple[str, str]:
    """The precision to evaluate in, and why: --precision, else the run's (recorded with its checkpoints), else fp32."""
    if asked:
        return asked, "--precision"
    if "precision" in card:
        return card["precision"], "the run's"
    return "fp32", "the checkpoint does not record the run's"


def result_line(result: dict) -> str:
    """The printed result."""
    r = result
    return (
        f"top-1 {r['top1']:.2f}% top-5 {r['top5']:.2f}% over {r['images']:,} validation images "
        f"({r['arch']} at step {r['step']} in {r['precision']}, {r['precision_from']}; {r['checkpoint']}; "
        f"{r['world_size']} ranks)"
    )


def main(argv: list[str] | None = None) -> int:
    """Evaluate; bad input ends with a one-line error and exit status 2."""
    args = parse_args(argv)
    try:
        path = checkpoint.resolve(args.checkpoint)
        card = checkpoint.card(path)
        shards = open_shards(args.data_dir, ("validation",), card["num_classes"])
        if shards.num_classes != card["num_classes"]:
            raise ValueError(
                f"--data-dir {args.data_dir}: {shards.num_classes} classes, the model predicts "
                f"{card['num_classes']}; pass the data the run was trained on"
            )
    except (ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        rank, world = distributed.init(args.dist_timeout)
    except launch.LaunchError as e:
        if launch.first_task():
            print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        cuda = args.data_device != "cpu" and torch.cuda.is_available()
        precision, precision_from = precision_of(card, args.precision)
        config = DataConfig(
            args.data_dir,
            batch_size=args.batch_size or card.get("batch_size", 50),
            dtype=deepspeed_json.DATA_DTYPES[precision],
            crop_size=card["crop_size"],
            val_resize=card["val_resize"],
            layout="NHWC" if cuda else "NCHW",
            data_device=args.data_device,
            data_threads=args.data_threads,
        )
        data = ImageNetData(config, rank, world, splits=("validation",), shards=shards)
        model = load_model(path, card, data.device, precision, args.ema)
        flip = card.get("val_flip", False) if args.flip is None else args.flip
        top1, top5, seen = validate(model, data.validation(), data.device, flip)
    except (ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.close()
    if rank == 0:
        result = {
            "top1": top1,
            "top5": top5,
            "images": seen,
            "arch": card["arch"],
            "step": card["step"],
            "weights": "average (--ema)" if args.ema else "trained",
            "flip": flip,
            "precision": precision,
            "precision_from": precision_from,
            "checkpoint": str(path),
            "data_dir": args.data_dir,
            "world_size": world,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        out = Path(args.out) if args.out else path.parent.parent / f"eval-{path.name}.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{result_line(result)}; written to {out}", flush=True)
    return 0


if __name__ == "__main__":
    ending.end_process(main())
