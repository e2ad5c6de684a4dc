"""After training: pipeline.evaluate (one rank and two, through the deepspeed launcher) and pipeline.export (a plain
fp32 state dict that torchvision loads as it is, safe to load, with its preprocessing and classes)."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from pipeline import checkpoint, engine
from pipeline.data import DataConfig, ImageNetData
from pipeline.launch import free_port, without_launcher
from pipeline.meters import validate
from pipeline.model import build_model
from pipeline.schedule import Schedule
from tests import procs
from tests.runs import ROOT, SMALL, SMALL_16BIT, ds_file, ok, run_module, train_cli


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> Path:
    """A finished fp32 run folder: ResNet-18 at 32 px, one epoch of the quirky dataset, validated and saved."""
    folder = tmp_path_factory.mktemp("trained")
    ok(train_cli("--deepspeed_config", ds_file(folder, 32, 16, "fp32"), "--data-dir", str(prepared), *SMALL,
                 "--epochs", "1", "--warmup-epochs", "0", "--out-dir", str(folder / "run"),
                 "--wandb-mode", "disabled"))  # fmt: skip
    return folder / "run"


@pytest.mark.slow
def test_export_is_a_plain_state_dict_torchvision_loads_with_its_card(trained, prepared, tmp_path):
    out = tmp_path / "export" / "model.pt"
    proc = run_module("pipeline.export", str(trained), "--out", str(out), check=True)
    newest = checkpoint.complete(trained / "checkpoints")[-1]
    assert f"{out}: resnet18 (" in proc.stdout
    assert str(newest) in proc.stdout
    weights = torch.load(out, weights_only=True)  # no pickled code runs
    card = json.loads(out.with_suffix(".json").read_text())
    model = torchvision.models.get_model(card["arch"], num_classes=card["num_classes"])
    model.load_state_dict(weights)  # strict: every key as torchvision names it
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in weights.values() if v.is_floating_point())
    wnids = (prepared / "labels.txt").read_text().split()
    assert card["classes"] == wnids[: card["num_classes"]]
    assert card["step"] == checkpoint.card(newest)["step"]
    assert card["preprocessing"]["resize_shorter_side"] == 36
    assert card["preprocessing"]["center_crop"] == 32
    assert card["preprocessing"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    # safetensors too, with the same tensors.
    from safetensors.torch import load_file

    run_module("pipeline.export", str(newest), "--out", str(tmp_path / "model.safetensors"), check=True)
    other = load_file(str(tmp_path / "model.safetensors"))
    assert other.keys() == weights.keys()
    assert all(torch.equal(other[k], weights[k]) for k in weights)


@pytest.mark.slow
def test_exported_logits_equal_the_engines(trained, tmp_path, process_group):
    """The DeepSpeed engine restored from the same checkpoint and the exported torchvision model, on one batch:
    equal within 1e-5 (both fp32 on the CPU; the same weights, so only operation order could differ)."""
    run_module("pipeline.export", str(trained), "--out", str(tmp_path / "model.pt"), check=True)
    saved = yaml.safe_load((trained / "config.yaml").read_text())
    s = Schedule(**saved["schedule"])
    model, _ = build_model("resnet18", saved["derived"]["num_classes"])
    eng = engine.build(model, saved["deepspeed"], s)
    checkpoint.load(eng, checkpoint.complete(trained / "checkpoints")[-1], {})
    exported = torchvision.models.get_model("resnet18", num_classes=saved["derived"]["num_classes"])
    exported.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    eng.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported.eval()(x), eng(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_evaluate_matches_the_export_and_is_the_same_on_two_ranks(trained, prepared, tmp_path, process_group):
    one = run_module("pipeline.evaluate", "--checkpoint", str(trained), "--data-dir", str(prepared),
                     "--out", str(tmp_path / "one.json"), "--data-threads", "1", check=True)  # fmt: skip
    result = json.loads((tmp_path / "one.json").read_text())
    images = json.loads((prepared / "manifest.json").read_text())["splits"]["validation"]["images"]
    assert result["images"] == images
    assert result["world_size"] == 1
    assert 0 <= result["top1"] <= result["top5"] <= 100
    assert one.stdout.splitlines()[-1].startswith(
        f"top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% over {images}"
    )
    # The run's own last validation, and a model loaded from the export through the same validation pipeline.
    last = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])
    assert result["top1"] == pytest.approx(last["last_top1"])
    from pipeline import export

    assert export.main([str(trained), "--out", str(tmp_path / "model.pt")]) == 0
    card = json.loads((tmp_path / "model.json").read_text())
    model = torchvision.models.get_model(card["arch"], num_classes=card["num_classes"])
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    data = ImageNetData(DataConfig(str(prepared), crop_size=32, val_resize=36, data_threads=1), splits=("validation",))
    top1, top5, seen = validate(model.eval(), data.validation(), torch.device("cpu"))
    assert (top1, top5, seen) == (pytest.approx(result["top1"]), pytest.approx(result["top5"]), images)
    # Two ranks through the deepspeed launcher: every image counted once, the same accuracy.
    launcher = Path(sys.executable).parent / "deepspeed"
    proc = procs.run([str(launcher), "--num_gpus", "2", "--master_port", str(free_port()),
                           str(ROOT / "pipeline" / "evaluate.py"), "--checkpoint", str(trained), "--data-dir",
                           str(prepared), "--out", str(tmp_path / "two.json"), "--data-threads", "1"],
                          capture_output=True, text=True, timeout=600, env=without_launcher(os.environ))  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2
    assert two["images"] == images
    assert (two["top1"], two["top5"]) == (pytest.approx(result["top1"]), pytest.approx(result["top5"]))


@pytest.fixture(scope="module")
def trained_bf16(prepared, tmp_path_factory) -> Path:
    """A run in DeepSpeed's bf16 wrapper (bf16 weights, fp32 norms): ShuffleNet at 32 px, 3 steps, validated."""
    folder = tmp_path_factory.mktemp("trained-bf16")
    ds = ds_file(folder, 32, 16, "bf16")
    ok(train_cli("--deepspeed_config", ds, "--data-dir", str(prepared), *SMALL_16BIT, "--epochs", "2",
                 "--max-steps", "3", "--out-dir", str(folder / "run"), "--wandb-mode", "disabled"))  # fmt: skip
    return folder / "run"


@pytest.mark.slow
def test_evaluate_computes_in_the_runs_precision_and_repeats_its_top1(trained_bf16, prepared, tmp_path, process_group):
    """By default evaluate computes as the run validated (bf16 here), so its top-1 is the run's last; its model's
    logits are the engine's, bit for bit, and an fp32 model's are not; --precision fp32 says so."""
    proc = run_module("pipeline.evaluate", "--checkpoint", str(trained_bf16), "--data-dir", str(prepared),
                      "--out", str(tmp_path / "bf16.json"), "--data-threads", "1", check=True)  # fmt: skip
    result = json.loads((tmp_path / "bf16.json").read_text())
    last = json.loads((trained_bf16 / "metrics.jsonl").read_text().splitlines()[-1])
    assert (result["precision"], result["precision_from"]) == ("bf16", "the run's")
    assert "in bf16, the run's;" in proc.stdout
    assert result["top1"] == pytest.approx(last["last_top1"], rel=1e-12)
    from pipeline import evaluate

    saved = yaml.safe_load((trained_bf16 / "config.yaml").read_text())
    path = checkpoint.complete(trained_bf16 / "checkpoints")[-1]
    card = checkpoint.card(path)
    eng = engine.build(
        build_model(card["arch"], card["num_classes"])[0], saved["deepspeed"], Schedule(**saved["schedule"])
    )
    checkpoint.load(eng, path, {})
    eng.eval()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.no_grad():
        models = {p: evaluate.load_model(path, card, torch.device("cpu"), p) for p in ("bf16", "fp32")}
        logits = {"bf16": models["bf16"](x), "fp32": models["fp32"](x.float())}
        assert torch.equal(logits["bf16"], eng(x))
        assert not torch.equal(logits["fp32"].float(), eng(x).float())
    args = ["--checkpoint", str(trained_bf16), "--data-dir", str(prepared), "--data-threads", "1"]
    proc = run_module(
        "pipeline.evaluate", *args, "--out", str(tmp_path / "fp32.json"), "--precision", "fp32", check=True
    )
    assert json.loads((tmp_path / "fp32.json").read_text())["precision"] == "fp32"
    assert "in fp32, --precision;" in proc.stdout


@pytest.mark.slow
def test_what_is_not_a_checkpoint_is_one_line(tmp_path, trained, capsys):
    """The commands' main functions, in this process (their command lines: test_train_runs_as_a_module...)."""
    from pipeline import config, evaluate, export

    assert evaluate.main(["--checkpoint", str(tmp_path), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}: neither a complete checkpoint")
    assert err.count("\n") == 1
    assert export.main([str(trained), "--out", str(tmp_path / "model.json")]) == 2
    assert "the model card goes to <out>.json" in capsys.readouterr().err
    assert export.main([str(trained), "--ema", "--out", str(tmp_path / "model.pt")]) == 2
    assert "holds no average of the weights (its run had no --ema-decay)" in capsys.readouterr().err
    # The help of --resume and of pipeline.evaluate says that a checkpoint is trusted code.
    assert "A checkpoint is trusted code" in " ".join(config.parser().format_help().split())
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--help"])
    assert "it is unpickled, so evaluate only checkpoints you trust" in " ".join(capsys.readouterr().out.split())
