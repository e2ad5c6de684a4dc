"""The first optimizer steps of a small model, twice: through our engine (deepspeed_json.configure, engine.build,
train.train_step, as train.py runs them) and through plain torch SGD, the oracle. tests/test_numerics.py compares
the two; on 2 gloo ranks the engine's side runs in tests/numerics_ranks.py.

Every configuration trains on the same global batch of 8 images per optimizer step: 1 or 2 ranks, 1 or 2
micro-batches each. Batch norm normalises over each micro-batch, so the oracle runs the same micro-batches one by
one, each loss divided by (ranks x micro-batches), and adds their gradients: the mean over the 8 images.

The schedule is DeepSpeed's WarmupDecayLR, built by DeepSpeed from the configuration as in a run; the oracle's lr
is the recipe's formula written out (`paper_lr`, `long_lr`). `long_run` goes further for the fp16 modes: the
production loss scale of 2^16 (this model overflows there, so steps are skipped), growths every WINDOW clean
steps, the end of warmup and the decay, gradient clipping, and a resume from a checkpoint in the middle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline import checkpoint, deepspeed_json, engine, loss_scale, schedule, train
from pipeline.meters import StepMeter
from tests.models import small_convnet

BATCH, STEPS, CLASSES = 8, 3, 3
MOMENTUM, WEIGHT_DECAY = 0.9, 0.1


def warmup_decay(peak: float, warmup: int, total: int, per_epoch: int) -> schedule.Schedule:
    """DeepSpeed's WarmupDecayLR as the committed configurations hold it: linear from 0 to `peak`, then to 0."""
    params = {"warmup_min_lr": 0.0, "warmup_max_lr": peak, "warmup_num_steps": warmup, "total_num_steps": total,
              "warmup_type": "linear"}  # fmt: skip
    return schedule.Schedule("WarmupDecayLR", params, total, per_epoch, optimizer_lr=peak)


# Warmup from 0 to 0.3 over 2 steps, then linear decay to 0 at step 6.
SCHEDULE = warmup_decay(0.3, warmup=2, total=6, per_epoch=3)
MODES = {
    "fp32": {},
    # The wrapper's loss scale starts at 2^8, not 2^16: this model's scaled gradients would overflow fp16 at 2^16,
    # and a skipped first step is another test's subject.
    "fp16": {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 8}},
    "autocast-fp16": {"torch_autocast": {"enabled": True, "dtype": "fp16"}},
    "bf16": {"bf16": {"enabled": True}},
    "autocast-bf16": {"torch_autocast": {"enabled": True, "dtype": "bf16"}},
}


def paper_lr(step: int) -> float:
    """SCHEDULE's lr written out from the recipe: 0.3 * step / 2 while warming up, then 0.3 * (6 - step) / 4."""
    return 0.3 * step / 2 if step < 2 else 0.3 * (6 - step) / 4


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 images (exact in bf16 and fp16, so no mode starts from rounded inputs) and labels of a step."""
    g = torch.Generator().manual_seed(100 + step)
    images = torch.randn(BATCH, 3, 8, 8, generator=g).bfloat16().float()
    return images, torch.randint(0, CLASSES, (BATCH,), generator=g)


def initial_model() -> torch.nn.Module:
    """small_convnet with weights exact in bf16 and fp16, so the wrappers' 16-bit copies start equal to fp32."""
    model = small_convnet()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model


def ds_config(
    mode: str,
    world: int,
    accum: int,
    window: int = 0,
    s: schedule.Schedule = SCHEDULE,
    clip: float = 0.0,
    modes: dict = MODES,
) -> tuple[dict, list[str]]:
    """The mode's DeepSpeed configuration (its precision section from `modes`), fitted as train.py fits it on this
    CPU host (--allow-cpu)."""
    sgd = {"lr": s.optimizer_lr, "momentum": MOMENTUM, "nesterov": True, "weight_decay": WEIGHT_DECAY}
    ds = {
        "train_batch_size": BATCH,
        "train_micro_batch_size_per_gpu": BATCH // world // accum,
        "gradient_clipping": clip,
        "optimizer": {"type": "SGD", "params": sgd},
        **modes[mode],
    }
    fitted, notes = deepspeed_json.configure(
        ds, f"{mode}.json", world, cuda=False, allow_cpu=True, loss_scale_window=window
    )
    return deepspeed_json.with_schedule(fitted, s), notes


def input_dtype(mode: str) -> torch.dtype:
    """The dtype the data pipeline hands this mode's model (deepspeed_json.DATA_DTYPES)."""
    return getattr(torch, deepspeed_json.DATA_DTYPES[mode])


def engine_steps(mode: str, rank: int, world: int, accum: int, steps: int = STEPS) -> dict:
    """Train `steps` optimizer steps on this rank's share of each batch through train.train_step; returns the fp32
    weights (the wrapper's masters where there is one), the lrs used and the skipped-step count."""
    ds, _ = ds_config(mode, world, accum)
    eng = engine.build(initial_model(), ds, SCHEDULE)
    scale = loss_scale.LossScale(eng)
    meter = StepMeter(BATCH, SCHEDULE.steps_per_epoch, eng.device)
    micro = BATCH // world // accum
    for step in range(steps):
        images, labels = data(step)
        for m in range(accum):
            # Rank r's micro-batch m: images [(r * accum + m) * micro, ...) of the step's batch.
            first = (rank * accum + m) * micro
            x, y = images[first : first + micro].to(input_dtype(mode)), labels[first : first + micro]
            train.train_step(eng, scale, train.cross_entropy, x, y, meter)
    rows = meter.flush()
    scale.resolve(rows)
    return {
        "weights": fp32_weights(eng),
        "lrs": [row["lr"] for row in rows],
        "skipped": scale.skipped,
        "scales": [float(row["loss_scale"]) for row in rows],
    }


def fp32_weights(eng) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 value: the wrapper's master copy where it keeps one, else the parameter."""
    masters = {p: m for p, m in engine._masters(eng.optimizer)}
    return {name: masters.get(p, p).detach().float().clone() for name, p in eng.module.named_parameters()}


def plain_sgd(model: torch.nn.Module) -> torch.optim.SGD:
    """The oracle's optimizer: torch SGD with Nesterov momentum, weight decay on weights (dim > 1) only; its lr is
    set before every step."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=0.0,
        momentum=MOMENTUM,
        nesterov=True,
    )


def torch_sgd_steps(world: int, accum: int, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """The oracle: plain torch SGD (Nesterov, no weight decay on batch norm and biases, the paper's lr per step) on
    the same micro-batches, their gradients averaged over all 8 images."""
    model = initial_model()
    sgd = plain_sgd(model)
    micro = BATCH // world // accum
    for step in range(steps):
        images, labels = data(step)
        sgd.zero_grad()
        for first in range(0, BATCH, micro):
            logits = model(images[first : first + micro])
            loss = torch.nn.functional.cross_entropy(logits, labels[first : first + micro])
            (loss / (world * accum)).backward()
        for group in sgd.param_groups:
            group["lr"] = paper_lr(step)
        sgd.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def update_errors(got: dict, expected: dict) -> dict[str, float]:
    """Per parameter: |got - expected| / |expected - initial|, the error relative to the oracle's whole update."""
    initial = dict(initial_model().named_parameters())
    return {
        name: float((got[name] - expected[name]).norm() / (expected[name] - initial[name].detach()).norm())
        for name in expected
    }


# The long run: 4 steps of warmup to 0.3, then linearly to 0 at step 16; the loss scale starts at 2^16 (the
# production value) and grows after WINDOW clean steps.
LONG = warmup_decay(0.3, warmup=4, total=16, per_epoch=4)
LONG_STEPS, WINDOW = 16, 3
FP16_AT_2_16 = {
    "fp16": {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": WINDOW}},
    "autocast-fp16": MODES["autocast-fp16"],
}


def long_lr(step: int) -> float:
    """LONG's lr written out: 0.3 * step / 4 while warming up, then 0.3 * (16 - step) / 12."""
    return 0.3 * step / 4 if step < 4 else 0.3 * (16 - step) / 12


def long_run(mode: str, clip: float = 0.0, resume_at: int | None = None, folder: Path | None = None) -> dict:
    """LONG_STEPS optimizer steps of `mode` through train.train_step, from a loss scale of 2^16; with `resume_at`,
    the engine is checkpointed after that many steps and a new one, resumed from it as train.py resumes, goes on.
    Returns the fp32 weights, and per step the lr, the loss scale after it and whether it was skipped."""
    ds, _ = ds_config(mode, world=1, accum=1, window=WINDOW, s=LONG, clip=clip, modes=FP16_AT_2_16)
    eng, scale = _long_engine(ds)
    rows = []
    for step in range(LONG_STEPS):
        if step == resume_at:
            # As train.py resumes: DeepSpeed's state, then the components (the loss scale, and the schedule, which
            # sets the lr of the next step).
            path = checkpoint.save(eng, folder, _components(eng, scale), card={}, keep=1)
            eng, scale = _long_engine(ds)
            assert checkpoint.load(eng, path, _components(eng, scale)) == []
        meter = StepMeter(BATCH, LONG.steps_per_epoch, eng.device)
        images, labels = data(step)
        train.train_step(eng, scale, train.cross_entropy, images.to(input_dtype(mode)), labels, meter)
        (row,) = meter.flush()
        scale.resolve([row])
        rows.append(row)
    skipped = [r["skipped_steps"] for r in rows]
    return {
        "weights": fp32_weights(eng),
        "lrs": [r["lr"] for r in rows],
        "scales": [float(r["loss_scale"]) for r in rows],
        "skipped": [step for step in range(LONG_STEPS) if skipped[step] > (skipped[step - 1] if step else 0)],
    }


def _long_engine(ds: dict):
    """A fresh engine over the initial model, its loss scale, and GradScaler's growth interval of WINDOW."""
    eng = engine.build(initial_model(), ds, LONG)
    loss_scale.set_growth_interval(eng, WINDOW)
    return eng, loss_scale.LossScale(eng, WINDOW)


def _components(eng, scale: loss_scale.LossScale) -> dict:
    """What a checkpoint of long_run holds besides DeepSpeed's state."""
    return {"schedule": schedule.Followed(eng, LONG), "loss_scale": scale}


def torch_sgd_long(skipped: list[int], clip: float = 0.0) -> tuple[dict[str, torch.Tensor], int]:
    """The oracle of long_run: torch SGD at long_lr(step), no update on the steps the engine skipped (overflow), the
    gradient norm clipped to `clip` (torch's clip_grad_norm_) where given; returns the weights and how many steps
    were clipped."""
    model = initial_model()
    sgd = plain_sgd(model)
    clipped = 0
    for step in range(LONG_STEPS):
        if step in skipped:
            continue
        images, labels = data(step)
        sgd.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        if clip:
            clipped += float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)) > clip
        for group in sgd.param_groups:
            group["lr"] = long_lr(step)
        sgd.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}, clipped


def ffcv_resolution(epoch: float, start_epoch: float, end_epoch: float, low: int, high: int, step: int) -> int:
    """libffcv/ffcv-imagenet's get_resolution, as its train_imagenet.py writes it (the oracle)."""
    if epoch <= start_epoch:
        return low
    if epoch >= end_epoch:
        return high
    interp = np.interp([epoch], [start_epoch, end_epoch], [low, high])
    return int(np.round(interp[0] / step)) * step
