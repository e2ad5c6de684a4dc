"""The first optimizer steps of a small model, twice: through our engine (engine.configure, engine.build,
train.train_step, as train.py runs them) and through plain torch SGD, the oracle. tests/test_numerics.py compares
the two; on 2 gloo ranks the engine's side runs in tests/numerics_ranks.py.

Every configuration trains on the same global batch of 8 images per optimizer step: 1 or 2 ranks, 1 or 2
micro-batches each. Batch norm normalises over each micro-batch, so the oracle runs the same micro-batches one by
one, each loss divided by (ranks x micro-batches), and adds their gradients: the mean over the 8 images.
"""

from __future__ import annotations

import torch

from pipeline import engine, schedule, train
from pipeline.meters import StepMeter
from tests.models import small_convnet

BATCH, STEPS, CLASSES = 8, 3, 3
MOMENTUM, WEIGHT_DECAY = 0.9, 0.1
# Warmup from 0.1 to 0.3 over 2 steps, then linear decay to 0 at step 6.
SCHEDULE = schedule.Schedule("warmup_decay", 0.1, 0.3, warmup_steps=2, total_steps=6, steps_per_epoch=3)
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
    """SCHEDULE's lr written out from the recipe: 0.1 + 0.2 * step / 2 while warming up, then 0.3 * (6 - step) / 4."""
    return 0.1 + 0.1 * step if step < 2 else 0.3 * (6 - step) / 4


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


def ds_config(mode: str, world: int, accum: int, window: int = 0) -> tuple[dict, list[str]]:
    """The mode's DeepSpeed configuration, fitted as train.py fits it on this CPU host (--allow-cpu)."""
    sgd = {"lr": SCHEDULE.peak_lr, "momentum": MOMENTUM, "nesterov": True, "weight_decay": WEIGHT_DECAY}
    ds = {
        "train_batch_size": BATCH,
        "train_micro_batch_size_per_gpu": BATCH // world // accum,
        "gradient_clipping": 0.0,
        "optimizer": {"type": "SGD", "params": sgd},
        **MODES[mode],
    }
    fitted, notes = engine.configure(ds, f"{mode}.json", world, cuda=False, allow_cpu=True, loss_scale_window=window)
    return engine.with_schedule(fitted, SCHEDULE), notes


def input_dtype(mode: str) -> torch.dtype:
    """The dtype the data pipeline hands this mode's model (engine.DATA_DTYPES)."""
    return getattr(torch, engine.DATA_DTYPES[mode])


def engine_steps(mode: str, rank: int, world: int, accum: int, steps: int = STEPS) -> dict:
    """Train `steps` optimizer steps on this rank's share of each batch through train.train_step; returns the fp32
    weights (the wrapper's masters where there is one), the lrs used and the skipped-step count."""
    ds, _ = ds_config(mode, world, accum)
    eng = engine.build(initial_model(), ds, SCHEDULE)
    scale = engine.LossScale(eng)
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


def torch_sgd_steps(world: int, accum: int, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """The oracle: plain torch SGD (Nesterov, no weight decay on batch norm and biases, the paper's lr per step) on
    the same micro-batches, their gradients averaged over all 8 images."""
    model = initial_model()
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    sgd = torch.optim.SGD(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=paper_lr(0),
        momentum=MOMENTUM,
        nesterov=True,
    )
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
