"""Every precision mode's first optimizer steps, through our engine, against plain torch SGD (tests/oracle.py): on 1
rank and on 2 gloo ranks that split the batch, with 1 and 2 micro-batches per step. Also DeepSpeed's fp16 wrapper
and its loss scale (DeepSpeed 0.19.8 leaves the loss unscaled), and the gradient all-reduce of batch norm.

DeepSpeed refuses its fp16 wrapper on its CPU accelerator; these tests let it (the fp16_cpu fixture), as the
wrapper's numerics do not depend on the device."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint, deepspeed_json, engine, loss_scale, train
from pipeline.launch import free_port, without_launcher
from pipeline.meters import StepMeter
from pipeline.model import build_model
from tests import oracle, procs
from tests.models import constant_schedule
from tests.runs import ROOT, SMALL_16BIT, ds_file, ok

# An update's error relative to the oracle's update, per mode: fp32 differs only in summation order; the 16-bit
# modes by their rounding, largest where batch norm normalises over 2 images (measured at most: fp32 1e-6, fp16
# 1.1e-2, bf16 2.4e-2). A wrong loss scale, a sum instead of a mean, or a wrong lr or weight decay is an error
# near 1 or more.
TOLERANCE = {"fp32": 1e-5, "fp16": 3e-2, "autocast-fp16": 3e-2, "bf16": 1e-1, "autocast-bf16": 1e-1}
CONFIGS = [(mode, accum) for mode in oracle.MODES for accum in (1, 2)]


def assert_follows_the_oracle(result: dict, mode: str, world: int, accum: int) -> None:
    assert_weights_follow(result["weights"], oracle.torch_sgd_steps(world, accum), mode, f"{world} ranks x {accum}")
    assert result["lrs"] == pytest.approx([oracle.paper_lr(step) for step in range(oracle.STEPS)], rel=1e-12)
    assert result["skipped"] == 0


def assert_weights_follow(weights: dict, expected: dict, mode: str, what: str) -> None:
    """Every parameter's update within the mode's tolerance of the oracle's."""
    initial = dict(oracle.initial_model().named_parameters())
    moved = {name: float((expected[name] - initial[name].detach()).norm()) for name in expected}
    for name, error in oracle.update_errors(weights, expected).items():
        if moved[name] < 1e-3 * max(moved.values()):
            # The oracle barely moves it (a convolution's bias before batch norm has no gradient): absolute terms.
            assert float((weights[name] - expected[name]).norm()) < 1e-3 * max(moved.values()), name
        else:
            assert error < TOLERANCE[mode], f"{mode}, {what}: {name} is off by {error:.2e}"


@pytest.mark.parametrize("mode, accum", CONFIGS)
def test_first_steps_equal_torch_sgd_on_one_rank(process_group, fp16_cpu, mode, accum):
    assert_follows_the_oracle(oracle.engine_steps(mode, rank=0, world=1, accum=accum), mode, 1, accum)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """tests/numerics_ranks.py's results from 2 gloo ranks."""
    out = tmp_path_factory.mktemp("numerics") / "ranks.pt"
    env = {**without_launcher(os.environ), "NUMERICS_OUT": str(out), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(ROOT / "tests" / "numerics_ranks.py")]  # fmt: skip
    proc = procs.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("mode, accum", CONFIGS)
def test_first_steps_equal_torch_sgd_on_two_ranks_that_split_the_batch(two_ranks, mode, accum):
    """The all-reduce averages over the ranks (a sum would double every update)."""
    assert_follows_the_oracle(two_ranks[f"{mode}-{accum}"], mode, 2, accum)


@pytest.mark.parametrize("mode", ["fp16", "bf16"])
def test_batch_norm_gradients_are_all_reduced_in_fp32(two_ranks, mode):
    """deepspeed_json.configure all-reduces the wrappers' gradients in fp32: batch norm's fp32 gradients arrive as
    the exact mean of the ranks'. DeepSpeed's default (the wrapper's 16-bit type) rounds them."""
    exact = 2 + torch.arange(8, dtype=torch.float32) * 2**-20  # the mean of the ranks' 1 + k 2^-20 and 3 + k 2^-20
    fitted, default = two_ranks[f"all-reduce-{mode}-fitted"], two_ranks[f"all-reduce-{mode}-default"]
    assert set(fitted) == {"1.weight", "1.bias"}
    for name in fitted:
        assert fitted[name].dtype == torch.float32, name
        assert torch.equal(fitted[name], exact), name
        rounded = exact.to(torch.float16 if mode == "fp16" else torch.bfloat16).float()
        assert torch.equal(default[name], rounded), name
        assert not torch.equal(rounded, exact), name


def test_deepspeed_0_19_8_leaves_the_fp16_wrappers_loss_unscaled(process_group, fp16_cpu):
    """Pins the installed DeepSpeed's behaviour that LossScale works around: without ZeRO, engine.backward does not
    multiply the loss by the fp16 wrapper's scale, yet its step divides the gradients by it. If this fails, the
    installed DeepSpeed changed (upstream pull request 8393 fixes it): LossScale then leaves the scaling to it."""
    import deepspeed

    constant = constant_schedule(0.1, total_steps=6, steps_per_epoch=3)
    ds, _ = oracle.ds_config("fp16", world=1, accum=1, s=constant)
    # No weight decay: the wrapper adds it after dividing by the scale, so only the gradient's part would shrink.
    ds["optimizer"]["params"]["weight_decay"] = 0.0
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 1, bias=False)
    reference = torch.nn.Linear(4, 1, bias=False)
    reference.load_state_dict(linear.state_dict())
    before = linear.weight.detach().clone()
    eng = engine.build(linear, ds, constant)
    assert type(eng.optimizer).__name__ == "FP16_UnfusedOptimizer"
    assert eng.optimizer.loss_scale_config.cur_scale == 256
    assert not loss_scale.deepspeed_scales_loss(eng), f"DeepSpeed {deepspeed.__version__} now scales the loss itself"
    eng.backward(eng(torch.ones(1, 4).half()).float().sum())
    eng.step()
    moved = before - oracle.fp32_weights(eng)["weight"]
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=oracle.MOMENTUM, nesterov=True)
    reference(torch.ones(1, 4)).sum().backward()
    sgd.step()
    # Every update is 1/256 of torch SGD's.
    torch.testing.assert_close(moved * 256, before - reference.weight.detach(), rtol=1e-3, atol=0)


def test_a_deepspeed_that_scales_the_loss_itself_is_not_scaled_twice(process_group, fp16_cpu, monkeypatch):
    """With upstream's fix (engine.backward scales through the wrapper), LossScale hands the loss on unscaled, and
    the steps still equal torch SGD's."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    plain = DeepSpeedEngine.backward

    def backward_as_fixed_upstream(self, loss, retain_graph=False, scale_wrt_gas=True):
        if loss_scale.wrapper_scale(self) is not None:
            loss = loss.float() * self.optimizer.loss_scale_config.cur_scale
        return plain(self, loss, retain_graph=retain_graph, scale_wrt_gas=scale_wrt_gas)

    monkeypatch.setattr(DeepSpeedEngine, "backward", backward_as_fixed_upstream)
    ds, _ = oracle.ds_config("fp16", world=1, accum=1)
    eng = engine.build(oracle.initial_model(), ds, oracle.SCHEDULE)
    assert loss_scale.deepspeed_scales_loss(eng)
    loss = torch.tensor(2.0)
    assert loss_scale.LossScale(eng).for_backward(loss) is loss
    assert_follows_the_oracle(oracle.engine_steps("fp16", rank=0, world=1, accum=2), "fp16", 1, 2)


@pytest.mark.parametrize("mode", ["fp16", "autocast-fp16"])
def test_an_injected_inf_is_skipped_and_the_scale_grows_after_its_window(process_group, fp16_cpu, mode):
    """Dynamic loss scaling in both fp16 modes (--loss-scale-window 2): the step with an inf changes no weight and
    halves the scale; after 2 clean steps the scale doubles; the schedule does not shift."""
    ds, _ = oracle.ds_config(mode, world=1, accum=1, window=2)
    eng = engine.build(oracle.initial_model(), ds, oracle.SCHEDULE)
    loss_scale.set_growth_interval(eng, 2)
    scale = loss_scale.LossScale(eng)
    meter = StepMeter(oracle.BATCH, oracle.SCHEDULE.steps_per_epoch, eng.device)
    start = scale.now()[0]
    for step in range(5):
        images, labels = oracle.data(step)
        before = oracle.fp32_weights(eng)
        images = images * (float("inf") if step == 1 else 1.0)
        train.train_step(eng, scale, train.cross_entropy, images.to(oracle.input_dtype(mode)), labels, meter)
        unchanged = all(torch.equal(before[n], w) for n, w in oracle.fp32_weights(eng).items())
        # Step 0 trains at lr 0 (the warmup's start): it moves nothing either way.
        assert unchanged == (step in (0, 1)), f"step {step}"
    rows = meter.flush()
    scale.resolve(rows)
    start = float(start)
    # Step 1 is skipped and halves the scale. GradScaler doubles it after 2 clean steps (steps 2, 3); DeepSpeed's
    # wrapper starts its count one step after the overflow, so it doubles after steps 2, 3 and 4.
    halved = [start / 2] * (2 if mode == "autocast-fp16" else 3)
    assert [float(r["loss_scale"]) for r in rows] == [start, *halved, *[start] * (4 - len(halved))]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1, 1]
    assert [r["lr"] for r in rows] == pytest.approx([oracle.paper_lr(s) for s in range(5)], rel=1e-12)


@pytest.mark.parametrize("clip, full, halved", [(0.0, 1.0, 0.5), (0.5, 0.25, 0.25), (1.5, 0.75, 0.5)])
def test_growth_steps_update_full_size_where_deepspeed_0_19_8_halves_them(process_group, fp16_cpu, clip, full, halved):
    """Pins the installed DeepSpeed's order, which loss_scale.unscale_by_the_scale_of_backward corrects: its fp16
    wrapper doubles the loss scale before it unscales, so on each growth step the gradients are divided by twice the
    scale they were multiplied by. Here the weight's gradient is [1, 1, 1, 1] (norm 2) at every step and the update
    is lr x gradient x the clip factor (no momentum, no weight decay): clip 0.5 gives a quarter, clip 1.5 three
    quarters. DeepSpeed alone moves half as far on growth steps (clipping at 0.5 hides it); the engine as built
    moves full size on every step. If the raw ratios change, DeepSpeed changed its order: the correction is then a
    no-op, and this pin is to be updated."""
    x = torch.ones(1, 4).half()
    constant = constant_schedule(0.1, total_steps=8, steps_per_epoch=8)
    for fixed in (False, True):
        ds = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_clipping": clip,
              "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 8, "loss_scale_window": 2},
              "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0}}}  # fmt: skip
        ds, _ = deepspeed_json.configure(ds, "pin.json", 1, cuda=False, allow_cpu=True)
        eng = engine.build(torch.nn.Linear(4, 1, bias=False), deepspeed_json.with_schedule(ds, constant), constant)
        if not fixed:
            # DeepSpeed's own methods again (the correction replaced them on the instance).
            del eng.optimizer.step, eng.optimizer.unscale_and_clip_grads
        scale, wrapper = loss_scale.LossScale(eng), eng.optimizer.loss_scale_config
        ratios, grew = [], []
        for _ in range(6):
            before, scale_before = oracle.fp32_weights(eng)["weight"], wrapper.cur_scale
            eng.backward(scale.for_backward(eng(x).float().sum()))
            eng.step()
            ratios.append(float((before - oracle.fp32_weights(eng)["weight"]).mean()) / 0.1)
            grew.append(wrapper.cur_scale > scale_before)
        assert sum(grew) >= 2
        expected = [halved if g and not fixed else full for g in grew]
        assert ratios == pytest.approx(expected, abs=1e-3), f"fixed {fixed}: scale grew {grew}, ratios {ratios}"


@pytest.mark.parametrize("mode", ["fp16", "autocast-fp16"])
@pytest.mark.parametrize("clip", [0.0, 0.4])
def test_a_long_fp16_run_equals_torch_sgd(process_group, fp16_cpu, mode, clip):
    """16 steps from the production loss scale of 2^16 through the end of warmup into the decay, with and without
    clipping: the scale grows every 3 clean steps until this model overflows, those steps are skipped, and the
    weights equal torch SGD's (no update on a skipped step, the recipe's lr on every other, clipped where asked)."""
    result = oracle.long_run(mode, clip)
    scales, skipped = result["scales"], result["skipped"]
    assert scales[0] == 2.0**16
    assert any(after > before for before, after in zip(scales, scales[1:], strict=False))
    assert skipped
    assert result["lrs"] == pytest.approx([oracle.long_lr(s) for s in range(oracle.LONG_STEPS)], rel=1e-12)
    expected, clipped = oracle.torch_sgd_long(skipped, clip)
    if clip:
        # Clipping acts on some steps, not all.
        assert 0 < clipped < oracle.LONG_STEPS - len(skipped)
    assert_weights_follow(result["weights"], expected, mode, f"16 steps, clip {clip}")


@pytest.mark.parametrize("mode", ["fp16", "autocast-fp16"])
def test_a_resume_in_the_middle_continues_as_the_straight_run(process_group, fp16_cpu, mode, tmp_path):
    """Checkpointed after 7 of 16 steps and resumed into a new engine as train.py resumes (DeepSpeed restores only
    its scheduler's step counter; `follow` sets the lr): the same lr on every step, the same loss scales and
    skips, the same weights as a run without the break."""
    straight = oracle.long_run(mode)
    resumed = oracle.long_run(mode, resume_at=7, folder=tmp_path)
    assert resumed["lrs"] == straight["lrs"]
    assert resumed["scales"] == straight["scales"]
    assert resumed["skipped"] == straight["skipped"]
    for name, weight in straight["weights"].items():
        assert torch.equal(resumed["weights"][name], weight), name


@pytest.mark.parametrize("mode", ["fp16", "autocast-fp16", "bf16", "autocast-bf16"])
def test_a_few_dozen_steps_lower_the_loss_as_fp32_does(process_group, fp16_cpu, mode):
    """30 steps on the same batches: each 16-bit mode's training loss falls as fp32's does."""
    curves = {m: loss_curve(m) for m in ("fp32", mode)}
    fp32, low = torch.tensor(curves["fp32"]), torch.tensor(curves[mode])
    assert fp32[-5:].mean() < 0.5 * fp32[:5].mean()
    assert low[-5:].mean() < 0.5 * low[:5].mean()
    assert (low - fp32).abs().max() < 0.05 * fp32.max(), (curves["fp32"], curves[mode])


def loss_curve(mode: str, steps: int = 30) -> list[float]:
    """The training loss of `steps` optimizer steps at a constant lr 0.1 over 4 fixed batches."""
    schedule = constant_schedule(0.1, steps, steps)
    ds, _ = oracle.ds_config(mode, world=1, accum=1)
    eng = engine.build(oracle.initial_model(), deepspeed_json.with_schedule(ds, schedule), schedule)
    scale, meter = loss_scale.LossScale(eng), StepMeter(oracle.BATCH, steps, eng.device)
    for step in range(steps):
        images, labels = oracle.data(step % 4)
        # Learnable: each class shifts the mean of one colour channel.
        images[torch.arange(oracle.BATCH), labels] += 2.0
        train.train_step(eng, scale, train.cross_entropy, images.to(oracle.input_dtype(mode)), labels, meter)
    return [row["loss"] for row in meter.flush()]


@pytest.mark.slow
def test_train_py_trains_with_the_fp16_wrapper_on_a_cpu(prepared, tmp_path):
    """The whole of pipeline/train.py with DeepSpeed's fp16 wrapper (bench/fp16_cpu_train.py lets DeepSpeed's CPU
    accelerator build it; --allow-cpu keeps fp16): its first two steps (WarmupDecayLR's lr 0, then the first lr
    above 0) move the weights as an fp32 run's do."""
    runs = {}
    for mode in ("fp32", "fp16"):
        script = ROOT / ("bench/fp16_cpu_train.py" if mode == "fp16" else "pipeline/train.py")
        out, ds = tmp_path / mode, Path(ds_file(tmp_path, 32, 16, mode))
        if mode == "fp16":
            # Starting at 2^8, not 2^16, where this model's first steps overflow: no step is skipped, so both runs
            # take the same steps.
            config = json.loads(ds.read_text())
            config["fp16"]["initial_scale_power"] = 8
            ds.write_text(json.dumps(config))
        args = [
            "--deepspeed_config",
            str(ds),
            "--data-dir",
            str(prepared),
            *SMALL_16BIT,
            "--epochs",
            "1",
            "--max-steps",
            "2",
            "--out-dir",
            str(out),
            "--wandb-mode",
            "disabled",
            "--allow-cpu",
            "--log-every",
            "1",
        ]
        proc = procs.run([sys.executable, str(script), *args], capture_output=True, text=True,
                         env=without_launcher(os.environ))  # fmt: skip
        stdout = ok(proc)
        runs[mode] = (stdout, checkpoint.weights(checkpoint.complete(out / "checkpoints")[-1]), out)
    stdout, _, out = runs["fp16"]
    assert "--allow-cpu: fp16 on this CPU host" in stdout
    assert "; fp16; " in stdout
    rows = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert {r["loss_scale"] for r in rows} == {256.0}
    assert rows[-1]["skipped_steps"] == 0
    torch.manual_seed(0)
    initial = build_model("shufflenet_v2_x0_5", 6)[0].state_dict()
    weights = [k for k, v in initial.items() if v.dim() > 1]
    moved = {mode: torch.cat([(w[k] - initial[k]).flatten() for k in weights]) for mode, (_, w, _) in runs.items()}
    # The first steps in fp16 move the weights as far as fp32's do (with the loss left unscaled: 1/256 as far).
    # Its direction is tested against torch SGD in test_first_steps_*: on a CPU batch norm takes fp16 inputs, and
    # this small model's gradients at 32 px (1x1 maps in its last stage) change by half from fp16 rounding alone.
    ratio = float(moved["fp16"].norm() / moved["fp32"].norm())
    assert 0.5 < ratio < 2, ratio
    assert float(torch.nn.functional.cosine_similarity(moved["fp16"], moved["fp32"], dim=0)) > 0.5
