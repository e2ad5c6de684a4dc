"""Export a trained model as a plain fp32 state dict that loads without running pickled code.

    python -m pipeline.export RUN_DIR|CHECKPOINT --out model.pt            (torch.load(..., weights_only=True))
    python -m pipeline.export RUN_DIR|CHECKPOINT --out model.safetensors   (safetensors)

`torchvision.models.get_model(arch, num_classes=N).load_state_dict(...)` takes the weights as they are (a run with
--blurpool: `pipeline.model.build_model(arch, N, blurpool=True)[0]`; `--ema` exports the average of the weights).
Beside them, `<out>.json` holds the model (arch, classes: the wnids of labels.txt in label order) and the
preprocessing the model was trained and validated with. DeepSpeed's checkpoint is unpickled to read the
weights, so export only checkpoints you trust; the exported file is then safe to hand on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pipeline import checkpoint, ending
from pipeline.data import augment


def preprocessing(card: dict) -> dict:
    """How an image becomes the model's input, as training's validation pipeline does it (pipeline/augment.py)."""
    return {
        "decode": "RGB, 8 bits per channel",
        "resize_shorter_side": card["val_resize"],
        "interpolation": "bilinear, antialiased",
        "center_crop": card["crop_size"],
        "flip_test_time_augmentation": card.get("val_flip", False),
        "scale": "pixel / 255",
        "mean": [round(m / 255, 6) for m in augment.MEAN],
        "std": [round(s / 255, 6) for s in augment.STD],
        "layout": "NCHW float32",
    }


def model_of(card: dict) -> str:
    """The Python expression that builds the exported weights' model."""
    if card.get("blurpool"):
        return f"pipeline.model.build_model({card['arch']!r}, {card['num_classes']}, blurpool=True)[0]"
    return f"torchvision.models.get_model({card['arch']!r}, num_classes={card['num_classes']})"


def save_weights(weights: dict[str, torch.Tensor], out: Path) -> None:
    """The state dict as safetensors (a .safetensors name) or a torch file of plain tensors."""
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(weights, str(out))
    else:
        torch.save(weights, out)


def export(source: str, out: Path, ema: bool = False) -> dict:
    """Write the weights (`ema`: their average) to `out` and the model card with preprocessing to `out` with .json;
    returns the card."""
    if out.suffix == ".json":
        raise ValueError(f"--out {out}: the model card goes to <out>.json; name the weights model.pt or .safetensors")
    path = checkpoint.resolve(source)
    card = checkpoint.card(path)
    weights = checkpoint.weights(path, ema)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_weights(weights, out)
    reader = "safetensors.torch.load_file" if out.suffix == ".safetensors" else "torch.load"
    described = {
        "arch": card["arch"],
        "num_classes": card["num_classes"],
        "weights": out.name,
        "load": f"{model_of(card)}.load_state_dict({reader}(path"
        f"{'' if out.suffix == '.safetensors' else ', weights_only=True'}))",
        "weights_are": "the average of the weights (--ema)" if ema else "the trained weights",
        "preprocessing": preprocessing(card),
        "classes": card["classes"],
        "checkpoint": str(path),
        "step": card["step"],
    }
    out.with_suffix(".json").write_text(json.dumps(described, indent=2) + "\n")
    return described


def main(argv: list[str] | None = None) -> int:
    """Export; bad input ends with a one-line error and exit status 2."""
    p = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.split("\n")[0])
    p.add_argument(
        "source",
        help="a run folder (its newest complete checkpoint) or a checkpoints/step* folder; "
        "it is unpickled, so export only checkpoints you trust",
    )
    p.add_argument("--out", required=True, help="model.pt (torch, plain tensors) or model.safetensors")
    p.add_argument("--ema", action="store_true", help="the average of the weights (runs with --ema-decay)")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        described = export(args.source, out, args.ema)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{out}: {described['arch']} ({described['num_classes']} classes, fp32) from {described['checkpoint']} "
        f"at step {described['step']}; preprocessing and classes in {out.with_suffix('.json')}"
    )
    return 0


if __name__ == "__main__":
    ending.end_process(main())
