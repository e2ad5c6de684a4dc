"""Two levers of the time-to-accuracy recipes without a run: the average of the weights (pipeline.ema) on a real
DeepSpeed engine against the formula written out, and validation with mirror images against the logits summed."""

import pytest
import torch

from pipeline import engine, loss_scale, train
from pipeline.ema import Ema, EmaOptions
from pipeline.faults import Guard
from pipeline.meters import StepMeter
from tests import oracle


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_the_average_follows_the_ema_formula_over_engine_steps(process_group, mode):
    """Every 2nd optimizer step e <- d^2 e + (1 - d^2) w over the weights and the batch-norm buffers, starting
    from the weights of the first update; kept in fp32 whatever the model computes in."""
    ds, _ = oracle.ds_config(mode, 1, 1)
    eng = engine.build(oracle.initial_model(), ds, oracle.SCHEDULE)
    average = Ema(eng.module, decay=0.8, every=2, precision=mode)
    scale = loss_scale.LossScale(eng)
    stepper = train.Stepper(eng, scale, train.cross_entropy, Guard(mode, 0, 1.0), levers=[average])
    meter = StepMeter(oracle.BATCH, oracle.SCHEDULE.steps_per_epoch, eng.device)
    expected, kept = None, 0.8**2
    for step in range(6):
        images, labels = oracle.data(step)
        assert stepper.step(images.to(oracle.input_dtype(mode)), labels, meter)
        now = {
            k: v.detach().double() if v.is_floating_point() else v.clone() for k, v in eng.module.state_dict().items()
        }
        if eng.global_steps % 2 == 0:
            if expected is None:
                expected = now
            else:
                expected = {k: kept * expected[k] + (1 - kept) * now[k] if now[k].is_floating_point() else now[k]
                            for k in now}  # fmt: skip
    state = average.state_dict()
    assert state["updates"] == 3
    assert set(state["module"]) == set(expected)
    for name, value in state["module"].items():
        if value.is_floating_point():
            assert value.dtype == torch.float32, name
        assert torch.allclose(value.to(expected[name].dtype), expected[name], rtol=1e-5, atol=1e-6), name
    # It is not the weights themselves, and a checkpoint's state gives the same average back.
    weight = next(k for k in state["module"] if k.endswith("weight"))
    assert not torch.allclose(state["module"][weight].double(), now[weight], atol=1e-4)
    again = Ema(eng.module, decay=0.8, every=2, precision=mode)
    again.load_state_dict(state)
    assert all(torch.equal(again.state_dict()["module"][k], v) for k, v in state["module"].items())


def test_ema_options_are_checked():
    with pytest.raises(ValueError, match=r"--ema-decay 1.0: must lie in \[0, 1\)"):
        EmaOptions(ema_decay=1.0)
    with pytest.raises(ValueError, match="--ema-every 0: must be at least 1"):
        EmaOptions(ema_every=0)


def test_validation_with_mirror_images_sums_both_logits(process_group):
    """validate(flip=True): each image's logits plus its mirror image's (FFCV's lr_tta), counted over the ranks;
    the oracle adds them by hand. A model that sees only the left half of an image tells the two apart."""
    from pipeline.meters import accuracy_counts, validate

    torch.manual_seed(0)
    weight = torch.randn(4, 3 * 8 * 4)

    def left_half(x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :, :4].reshape(len(x), -1) @ weight.T

    images, labels = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    batches = [(images[:8], labels[:8]), (images[8:], labels[8:])]
    for flip in (False, True):
        logits = left_half(images) + (left_half(images.flip(3)) if flip else 0)
        seen, top1, top5 = accuracy_counts(logits, labels).tolist()
        assert validate(left_half, batches, torch.device("cpu"), flip) == (100 * top1 / seen, 100 * top5 / seen, 16)
    assert validate(left_half, batches, torch.device("cpu"), True) != validate(left_half, batches, torch.device("cpu"))
