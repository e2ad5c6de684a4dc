"""pipeline/train.py end to end on the CPU: one process that learns, two ranks through the deepspeed
launcher, resume equivalence, and the errors a user can hit."""

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import checkpoint, cpu, deepspeed_json, engine, loss_scale, train
from pipeline.data import DataConfig, ImageNetData
from pipeline.data.shards import IGNORE, shard_bounds
from pipeline.meters import StepMeter, validate
from pipeline.schedule import Schedule, lr_at
from tests import oracle, procs
from tests.models import constant_schedule
from tests.runs import CPU_ONLY, ROOT, SMALL, ds_file, metrics, ok, train_cli, weights
from tests.shardsets import labelled_set
from tests.wandb_files import logged


@pytest.mark.slow
def test_one_process_training_learns_and_records_everything(prepared, tmp_path):
    out = tmp_path / "run"
    args = [
        "--data-dir", str(prepared), *SMALL, "--epochs", "3", "--warmup-epochs", "1", "--log-every", "2",
        "--keep-checkpoints", "2", "--save-every-steps", "3", "--out-dir", str(out), "--wandb-mode", "offline",
    ]  # fmt: skip
    stdout = ok(train_cli("--deepspeed_config", str(ROOT / "ds_configs" / "cpu.json"), *args))
    manifest = json.loads((prepared / "manifest.json").read_text())
    images, classes = manifest["splits"]["train"]["images"], manifest["num_classes"]
    per_epoch = math.ceil(images / 64)
    assert f"{3 * per_epoch} steps ({per_epoch} per epoch)" in stdout
    assert "1 ranks x 32 x 2 accumulation" in stdout
    assert f"saved checkpoint {out / 'checkpoints' / checkpoint.tag(per_epoch)} at step {per_epoch}" in stdout

    epochs, summary = metrics(out)
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert {"epoch", "train_loss", "val_top1", "val_top5", "lr", "images_per_sec", "skipped_steps"} <= set(epochs[0])
    # It learns: the loss falls and validation accuracy ends far above chance.
    assert epochs[-1]["train_loss"] < 0.7 * epochs[0]["train_loss"]
    assert epochs[-1]["val_top1"] > 3 * 100 / classes
    assert epochs[-1]["val_top5"] >= epochs[-1]["val_top1"]
    assert summary["best_top1"] == max(e["val_top1"] for e in epochs)
    assert summary["steps"] == 3 * per_epoch
    assert f"done: val top-1 {epochs[-1]['val_top1']:.1f}%" in stdout
    assert str(out / "wandb") in stdout

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["run"]["model"]["arch"] == "resnet18"
    assert saved["derived"]["train_images"] == images
    assert saved["schedule"]["total_steps"] == 3 * per_epoch
    assert saved["deepspeed"]["gradient_accumulation_steps"] == 2
    # On a CPU: NCHW batches and model, in cpu.json's precision for this processor (bf16 batches cast from DALI's
    # float32 where bf16 is native, float32 elsewhere), two batches prefetched.
    assert not saved["derived"]["channels_last"]
    dtype = deepspeed_json.DATA_DTYPES[cpu.default_precision()]
    assert {k: saved["derived"]["data"][k] for k in ("layout", "dtype", "data_prefetch", "batch_size")} == {
        "layout": "NCHW", "dtype": dtype, "data_prefetch": 2, "batch_size": 32}  # fmt: skip
    assert saved["derived"]["precision"] == cpu.default_precision()
    # The whole schedule, drawn: lr.png in the run folder.
    assert (out / "lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # No GPU decoder, so nothing allocated up front; --data-threads 1 as asked.
    assert saved["derived"]["data_threads"] == 1
    assert saved["derived"]["decoder_memory"] == {"gpu_bytes": 0, "pinned_bytes": 0}
    # Every 3 steps and at each epoch's end (the last step is both); the 2 newest complete ones are kept.
    assert "at step 3\n" in stdout
    assert stdout.count(f"at step {3 * per_epoch}\n") == 2
    saves = sorted({*range(3, 3 * per_epoch + 1, 3), *range(per_epoch, 3 * per_epoch + 1, per_epoch)})
    assert [p.name for p in checkpoint.complete(out / "checkpoints")] == [checkpoint.tag(s) for s in saves[-2:]]

    # steps.jsonl: one row per optimizer step, over all ranks' images, with the training top-1 error.
    rows = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 3 * per_epoch + 1))
    assert all(r["epoch"] == pytest.approx(r["step"] / per_epoch) and 0 <= r["error"] <= 100 for r in rows)
    first, last = rows[:per_epoch], rows[-per_epoch:]
    assert sum(r["error"] for r in last) < sum(r["error"] for r in first)

    # wandb (offline) wrote the run config, one history row per optimizer step, and the summary.
    run = logged(out)
    assert run["config"]["schedule"] == saved["schedule"]
    assert run["config"]["derived"]["num_classes"] == classes
    steps = {h["_step"]: h for h in run["history"] if "train/loss" in h}
    assert sorted(steps) == list(range(1, 3 * per_epoch + 1))
    schedule = Schedule(**saved["schedule"])
    assert all(h["train/lr"] == pytest.approx(lr_at(schedule, s - 1)) for s, h in steps.items())
    assert [h["epoch/val_top1"] for h in run["history"] if "epoch/val_top1" in h] == [e["val_top1"] for e in epochs]
    assert run["summary"]["best_top1"] == summary["best_top1"]


@pytest.mark.slow
def test_speed_options_and_an_edited_scheduler_reach_the_run(prepared, tmp_path):
    """The throughput levers as flags: channels-last on a CPU too, DALI's prefetch depth and hardware decoder share.
    And a scheduler edited in the JSON (WarmupCosineLR, a warmup of 45 of 90 epochs) is the one DeepSpeed runs:
    fitted to this run, printed, and the lr of every step."""
    out = tmp_path / "run"
    edited = json.loads((ROOT / "ds_configs" / "cpu.json").read_text())
    params = {"total_num_steps": 1801710, "warmup_num_steps": 900855, "warmup_type": "linear"}
    edited["scheduler"] = {"type": "WarmupCosineLR", "params": params}
    (tmp_path / "cosine.json").write_text(json.dumps(edited))
    args = ["--data-dir", str(prepared), *SMALL, "--epochs", "2", "--max-steps", "2",
            "--memory-format", "channels_last", "--data-prefetch", "3", "--hw-decoder-load", "0.5",
            "--out-dir", str(out), "--wandb-mode", "disabled"]  # fmt: skip
    stdout = ok(train_cli("--deepspeed_config", str(tmp_path / "cosine.json"), *args))
    schedule = Schedule(**yaml.safe_load((out / "config.yaml").read_text())["schedule"])
    assert schedule.kind == "WarmupCosineLR"
    assert schedule.params["warmup_num_steps"] == schedule.total_steps // 2
    assert "cosine.json: WarmupCosineLR fitted to this run" in stdout
    assert "schedule WarmupCosineLR (DeepSpeed): " in stdout
    assert f"total_num_steps {schedule.total_steps};" in stdout
    rows = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == [lr_at(schedule, 0), lr_at(schedule, 1)]
    assert rows[1]["lr"] > 0
    derived = yaml.safe_load((out / "config.yaml").read_text())["derived"]
    assert derived["channels_last"]
    assert {k: derived["data"][k] for k in ("layout", "data_prefetch", "hw_decoder_load")} == {
        "layout": "NHWC", "data_prefetch": 3, "hw_decoder_load": 0.5}  # fmt: skip
    conv = weights(out, 2)["conv1.weight"]
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert not conv.is_contiguous()


@pytest.mark.slow
def test_resume_gives_the_same_weights_as_a_straight_run(prepared, tmp_path):
    ds = ds_file(tmp_path, 64, 32, "fp32")
    common = ["--deepspeed_config", ds, "--data-dir", str(prepared), *SMALL, "--epochs", "2", "--warmup-epochs", "1"]
    images = json.loads((prepared / "manifest.json").read_text())["splits"]["train"]["images"]
    per_epoch = math.ceil(images / 64)
    ok(train_cli(*common, "--out-dir", str(tmp_path / "straight"), "--wandb-mode", "disabled"))
    # Stop two steps into the second epoch, then continue in a new process.
    first = ok(
        train_cli(
            *common, "--out-dir", str(tmp_path / "split"), "--max-steps", str(per_epoch + 2), "--wandb-mode", "disabled"
        )
    )
    assert f"at step {per_epoch + 2}" in first
    second = ok(train_cli(*common, "--out-dir", str(tmp_path / "split"), "--resume", "auto", "--wandb-mode", "offline"))
    assert f"resumed from {tmp_path / 'split' / 'checkpoints' / checkpoint.tag(per_epoch + 2)} at step" in second
    # After the resume DeepSpeed's WarmupDecayLR (which restores only its step counter) sets the straight run's lr
    # on every step, the pure function of the step, decaying in the second epoch.
    saved = yaml.safe_load((tmp_path / "split" / "config.yaml").read_text())["schedule"]
    schedule = Schedule(**saved)
    assert schedule.kind == "WarmupDecayLR"
    lrs = {h["_step"]: h["train/lr"] for h in logged(tmp_path / "split")["history"] if "train/lr" in h}
    assert sorted(lrs) == list(range(per_epoch + 3, 2 * per_epoch + 1))
    assert all(lr == pytest.approx(lr_at(schedule, step - 1)) for step, lr in lrs.items())
    rows = map(json.loads, (tmp_path / "straight" / "steps.jsonl").read_text().splitlines())
    straight_lrs = {r["step"]: r["lr"] for r in rows}
    assert all(lr == straight_lrs[step] for step, lr in lrs.items())
    assert lrs[2 * per_epoch] < lrs[per_epoch + 3]
    straight, split = weights(tmp_path / "straight", 2 * per_epoch), weights(tmp_path / "split", 2 * per_epoch)
    assert straight.keys() == split.keys()
    for name in straight:
        assert torch.allclose(straight[name].float(), split[name].float(), rtol=1e-5, atol=1e-6), name
    # Exact mid-epoch resume: every step's loss (over the same images) equals the uninterrupted run's.
    losses = [
        {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / run / "steps.jsonl").read_text().splitlines())}
        for run in ("straight", "split")
    ]
    assert sorted(losses[0]) == sorted(losses[1]) == list(range(1, 2 * per_epoch + 1))
    assert all(losses[1][step] == pytest.approx(loss, rel=1e-5) for step, loss in losses[0].items())
    a, b = metrics(tmp_path / "straight")[1], metrics(tmp_path / "split")[1]
    assert a["steps"] == b["steps"] == 2 * per_epoch
    assert a["last_top1"] == pytest.approx(b["last_top1"])


@pytest.mark.slow
def test_two_ranks_through_the_deepspeed_launcher(tmp_path):
    """Ranks see disjoint slices of each epoch and end with identical weights (BN statistics stay per rank) and an
    identical average of the weights (--ema-decay: it reads rank 0's statistics)."""
    data = labelled_set(tmp_path / "data", train=45, val=21)
    report = tmp_path / "ranks.json"
    ds = ds_file(tmp_path, 16, 4, "fp32")
    launcher = Path(sys.executable).parent / "deepspeed"
    from pipeline.launch import free_port

    proc = procs.run(
        [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "tests" / "train_ranks.py"),
         "--deepspeed_config", ds, "--data-dir", str(data), *SMALL, "--epochs", "2",
         "--warmup-epochs", "1", "--out-dir", str(tmp_path / "run"), "--wandb-mode", "disabled", "--ema-decay", "0.8",
         "--ema-every", "2"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "RANKS_REPORT": str(report)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = json.loads(report.read_text())["ranks"]
    for epoch in ("0", "1"):
        slices = []
        for rank, seen in enumerate(ranks):
            start, end = shard_bounds(45, rank, 2)
            # Each rank: 3 optimizer steps x 2 micro-batches x 4 images; its first `end - start` are its slice.
            assert len(seen["seen"][epoch]) == 24
            slices.append(set(seen["seen"][epoch][: end - start]))
            assert len(slices[-1]) == end - start
        assert not slices[0] & slices[1]
        assert slices[0] | slices[1] == set(range(45))
    assert ranks[0]["params"] == ranks[1]["params"]
    assert ranks[0]["bn_means"] != ranks[1]["bn_means"]
    assert ranks[0]["ema"] == ranks[1]["ema"] is not None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data-dir", "/nonexistent"], "/nonexistent"),
        (["--arch", "resnet51"], "--arch resnet51: not a torchvision classification model"),
        (["--deepspeed_config", "missing.json"], "--deepspeed_config missing.json: cannot read it as JSON"),
        (["--epochs", "2", "--warmup-epochs", "3"], "--warmup-epochs 3.0: must lie in [0, --epochs 2)"),
        # 228 training images at B = 64: 4 steps per epoch, and a warmup of all 4 (not a ZeroDivisionError).
        (["--epochs", "1", "--warmup-epochs", "0.99"], "WarmupDecayLR: warmup_num_steps 4 is the whole run (4 steps)"),
        (["--loss-scale-window", "-1"], "--loss-scale-window -1: must not be negative"),
        (["--loss-scale-window", "50"], "which has no loss scale; leave the flag out or use an fp16 configuration"),
        # No silent CPU fallback: a GPU configuration on a host without usable CUDA stops, naming why.
        pytest.param(["--deepspeed_config", str(ROOT / "ds_configs" / "bs256-autocast.json")],
                     "bs256-autocast.json asks for autocast-fp16, but CUDA is not usable on this host", marks=CPU_ONLY),
        pytest.param(["--data-device", "gpu"], "--data-device gpu, but CUDA is not usable on this host: ",
                     marks=CPU_ONLY),
    ],
)  # fmt: skip
def test_bad_input_fails_before_any_heavy_work(prepared, capsys, args, message):
    base = {"--deepspeed_config": str(ROOT / "ds_configs" / "cpu.json"), "--data-dir": str(prepared)}
    argv = [x for k, v in base.items() if k not in args for x in (k, v)] + args
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert message in err
    assert err.count("\n") == 1


@pytest.mark.slow
def test_a_line_that_rank_0_says_comes_out_when_the_other_rank_stops_first(tmp_path):
    """DeepSpeed's launcher ends a node's ranks as soon as one fails: rank 1, which finds the bad option at once and
    leaves its line to rank 0, waits for rank 0 (3 s late) to say it."""
    data, ds = labelled_set(tmp_path / "data", train=45, val=21), ds_file(tmp_path, 16, 4, "fp32")
    launcher, script = Path(sys.executable).parent / "deepspeed", ROOT / "tests" / "train_rank0_late.py"
    from pipeline.launch import free_port

    proc = procs.run(
        [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), str(script),
         "--deepspeed_config", ds, "--data-dir", str(data), *SMALL, "--epochs", "2", "--warmup-epochs", "3",
         "--out-dir", str(tmp_path / "run"), "--wandb-mode", "disabled"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "LATE": "3"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]
    assert errors == ["error: --warmup-epochs 3.0: must lie in [0, --epochs 2)"], proc.stderr[-3000:]


def test_the_epoch_row_counts_images_and_averages_the_loss(process_group, monkeypatch):
    """epoch_row on a real engine: images/s is micro-steps x ranks x micro-batch / seconds, the loss the mean over
    micro-steps (3 micro-steps of 16 images, losses 1, 2 and 3, in 2 seconds)."""
    s = constant_schedule(0.1, total_steps=4, steps_per_epoch=4)
    ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0,
          "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}  # fmt: skip
    eng = engine.build(torch.nn.Linear(4, 3), deepspeed_json.with_schedule(ds, s), s)
    meter = StepMeter(16, 4, eng.device)
    for loss in (1.0, 2.0, 3.0):
        meter.micro_step(torch.tensor(loss), torch.zeros(16, 3), torch.zeros(16, dtype=torch.long))
    monkeypatch.setattr(meter, "elapsed", lambda: 2.0)
    row = train.epoch_row(eng, 1, 16, loss_scale.LossScale(eng), 0, meter, (None, None))
    assert row["images_per_sec"] == 3 * 16 / 2
    assert row["train_loss"] == 2.0


def test_batch_that_does_not_split_over_the_ranks(prepared, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    bs8k = str(ROOT / "ds_configs" / "bs8k.json")
    assert train.main(["--deepspeed_config", bs8k, "--data-dir", str(prepared)]) == 2
    assert "train_batch_size 8192 is not a multiple of micro-batch 32 x 3 ranks" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_from_an_incomplete_checkpoint_is_refused(prepared, tmp_path):
    broken = tmp_path / "run" / "checkpoints" / checkpoint.tag(5)
    broken.mkdir(parents=True)
    proc = train_cli("--deepspeed_config", str(ROOT / "ds_configs" / "cpu.json"), "--data-dir", str(prepared), *SMALL,
                     "--epochs", "2", "--warmup-epochs", "1", "--out-dir", str(tmp_path / "run"),
                     "--resume", str(broken), "--wandb-mode", "disabled")  # fmt: skip
    assert proc.returncode == 2
    assert f"--resume {broken}: not a complete checkpoint" in proc.stderr


@pytest.fixture(scope="module")
def yaml_run(prepared, tmp_path_factory):
    """One run configured by a --config YAML (3 epochs, validation every 2nd, label smoothing 0.1), with flags
    overriding two of its keys, and the defaults for everything else (warmup included)."""
    folder = tmp_path_factory.mktemp("yaml-run")
    options = {"data_dir": str(prepared), "deepspeed_config": str(ROOT / "ds_configs" / "cpu.json"),
               "arch": "resnet18", "crop_size": 32, "val_resize": 36, "data_threads": 1, "epochs": 3,
               "eval_every": 2, "label_smoothing": 0.1, "seed": 5, "wandb_mode": "disabled",
               "out_dir": str(folder / "ignored")}  # fmt: skip
    (folder / "run.yaml").write_text(yaml.safe_dump(options))
    proc = train_cli("--config", str(folder / "run.yaml"), "--out-dir", str(folder / "run"), "--seed", "7")
    return folder / "run", ok(proc)


@pytest.mark.slow
def test_a_config_yaml_runs_through_train_py_with_flags_winning(yaml_run):
    out, stdout = yaml_run
    # config.yaml holds the options by section; the YAML in and the flags name them flat.
    saved = {k: v for section in yaml.safe_load((out / "config.yaml").read_text())["run"].values() for k, v in
             section.items()}  # fmt: skip
    assert {k: saved[k] for k in ("arch", "epochs", "eval_every", "label_smoothing", "crop_size")} == {
        "arch": "resnet18", "epochs": 3, "eval_every": 2, "label_smoothing": 0.1, "crop_size": 32}  # fmt: skip
    # The flags win over the file.
    assert saved["seed"] == 7
    assert saved["out_dir"] == str(out)
    # --epochs 3 with the default warmup is valid: cpu.json's 5 of 90 epochs, fitted to 3 epochs of this data and
    # printed with the schedule.
    assert saved["warmup_epochs"] is None
    schedule = yaml.safe_load((out / "config.yaml").read_text())["schedule"]
    per_epoch = schedule["steps_per_epoch"]
    assert schedule["params"]["warmup_num_steps"] == max(2, round(5 * 3 / 90 * per_epoch))
    assert schedule["params"]["total_num_steps"] == 3 * per_epoch
    assert "cpu.json: WarmupDecayLR fitted to this run" in stdout
    assert f"({schedule['params']['warmup_num_steps']} warmup steps: " in stdout


@pytest.mark.slow
def test_a_resume_in_the_middle_of_the_resolution_ramp_with_every_lever_on_continues_as_the_straight_run(
    prepared, tmp_path, process_group
):
    """Progressive resizing by step (24 to 32 px over epochs 0.5 to 1.5), BlurPool, an average of the weights,
    validation at its own crop with mirror images: stopped one step into the second epoch (in the middle of the
    ramp) and resumed, the run trains every step at the straight run's size and loss, and ends with its weights and
    average."""
    ds = ds_file(tmp_path, 64, 32, "fp32")
    levers = ["--ramp-start-size", "24", "--ramp-start-epoch", "0.5", "--ramp-end-epoch", "1.5", "--ramp-rounding",
              "4", "--ramp-by", "step", "--blurpool", "--ema-decay", "0.9", "--val-flip", "--val-crop-size", "36",
              "--val-resize", "40"]  # fmt: skip
    common = ["--deepspeed_config", ds, "--data-dir", str(prepared), *SMALL, "--epochs", "2", "--warmup-epochs", "1",
              *levers, "--wandb-mode", "disabled"]  # fmt: skip
    images = json.loads((prepared / "manifest.json").read_text())["splits"]["train"]["images"]
    per_epoch = math.ceil(images / 64)
    ok(train_cli(*common, "--out-dir", str(tmp_path / "straight")))
    ok(train_cli(*common, "--out-dir", str(tmp_path / "split"), "--max-steps", str(per_epoch + 1)))
    second = ok(train_cli(*common, "--out-dir", str(tmp_path / "split"), "--resume", "auto"))
    assert "resumed from" in second
    runs = [tmp_path / "straight", tmp_path / "split"]
    losses = [{r["step"]: r["loss"] for r in map(json.loads, (run / "steps.jsonl").read_text().splitlines())}
              for run in runs]  # fmt: skip
    assert sorted(losses[0]) == sorted(losses[1]) == list(range(1, 2 * per_epoch + 1))
    assert all(losses[1][step] == pytest.approx(loss, rel=1e-5) for step, loss in losses[0].items())
    rows = [metrics(run)[0] for run in runs]
    # Each epoch's sizes: FFCV's rule at its steps' epoch positions (the oracle), in both runs.
    sides = [sorted({oracle.ffcv_resolution(s / per_epoch, 0.5, 1.5, 24, 32, 4) for s in range(e * per_epoch,
             (e + 1) * per_epoch)}) for e in (0, 1)]  # fmt: skip
    assert len(sides[1]) > 1
    assert [r["train_crop"] for r in rows[0]] == [s[0] if len(s) == 1 else s for s in sides]
    assert rows[1][-1]["train_crop"] == rows[0][-1]["train_crop"]
    assert rows[0][-1]["val_crop"] == 36
    assert rows[0][-1]["val_top1_ema"] == pytest.approx(rows[1][-1]["val_top1_ema"])
    assert rows[0][-1]["val_top1"] == pytest.approx(rows[1][-1]["val_top1"])
    states = [torch.load(run / "checkpoints" / checkpoint.tag(2 * per_epoch) / checkpoint.MODEL_STATES,
                         weights_only=False) for run in runs]  # fmt: skip
    for key in ("module", "ema"):
        a, b = (s["module"] if key == "module" else s["components"]["ema"]["module"] for s in states)
        assert a.keys() == b.keys() and any(".conv.weight" in k for k in a)
        for name in a:
            assert torch.allclose(a[name].float(), b[name].float(), rtol=1e-5, atol=1e-6), (key, name)
    card = checkpoint.card(checkpoint.complete(runs[0] / "checkpoints")[-1])
    assert (card["crop_size"], card["val_resize"], card["blurpool"], card["val_flip"]) == (36, 40, True, True)
    # evaluate's model of the average (BlurPool from the card, --ema's weights) validated as the card says (its
    # crop, resize and mirror images) repeats the run's average top-1; export --ema writes that average.
    from pipeline import evaluate, export

    path = checkpoint.complete(runs[0] / "checkpoints")[-1]
    model = evaluate.load_model(path, card, torch.device("cpu"), "fp32", ema=True)
    config = DataConfig(str(prepared), batch_size=32, crop_size=card["crop_size"], val_resize=card["val_resize"],
                        data_threads=1)  # fmt: skip
    top1, _, _ = validate(model, ImageNetData(config, splits=("validation",)).validation(), torch.device("cpu"), True)
    assert top1 == pytest.approx(rows[0][-1]["val_top1_ema"], rel=1e-9)
    assert export.main([str(runs[0]), "--ema", "--out", str(tmp_path / "ema.pt")]) == 0
    exported = torch.load(tmp_path / "ema.pt", weights_only=True)
    assert all(torch.equal(exported[k], v.float()) for k, v in states[0]["components"]["ema"]["module"].items())


@pytest.mark.slow
def test_eval_every_2_validates_every_second_epoch_and_the_last(yaml_run):
    epochs, summary = metrics(yaml_run[0])
    assert [(e["epoch"], e["val_top1"] is not None) for e in epochs] == [(0, False), (1, True), (2, True)]
    assert summary["last_top1"] == epochs[2]["val_top1"]


@pytest.mark.slow
def test_label_smoothing_is_the_loss_the_run_trains_with(yaml_run):
    """The run trains on cross-entropy with the configured smoothing: (1 - e) CE + e x the mean over classes of
    -log p, padding labels left out."""
    smoothing = yaml.safe_load((yaml_run[0] / "config.yaml").read_text())["run"]["model"]["label_smoothing"]
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 4, 2, IGNORE, 1, 3])
    logp = torch.log_softmax(logits, 1)[labels != IGNORE]
    kept = labels[labels != IGNORE]
    expected = (0.9 * -logp[torch.arange(5), kept] + 0.1 * -logp.mean(1)).mean()
    assert train.cross_entropy(logits, labels, smoothing).item() == pytest.approx(expected.item(), rel=1e-6)
    plain = train.cross_entropy(logits, labels).item()
    assert plain == pytest.approx(-logp[torch.arange(5), kept].mean().item(), rel=1e-6)
    assert abs(plain - expected.item()) > 1e-3


@pytest.mark.slow
def test_resume_with_another_schedule_is_refused(yaml_run, prepared):
    """The YAML run's checkpoint under --epochs 4: another schedule, so resuming would train on the wrong lr."""
    out = yaml_run[0]
    cpu = str(ROOT / "ds_configs" / "cpu.json")
    proc = train_cli("--deepspeed_config", cpu, "--data-dir", str(prepared), *SMALL, "--epochs", "4", "--out-dir",
                     str(out), "--resume", "auto", "--wandb-mode", "disabled")  # fmt: skip
    assert proc.returncode == 2
    newest = checkpoint.complete(out / "checkpoints")[-1]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --resume {newest}: it was trained on schedule ")
    assert "resume with its --epochs, --schedule and DeepSpeed config, or a new --out-dir" in proc.stderr
