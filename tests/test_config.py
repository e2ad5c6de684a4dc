"""Run options (YAML, flags, validation), the model set-up, and fitting a DeepSpeed configuration to a host."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from torchvision.models.resnet import BasicBlock, Bottleneck

from pipeline import config, deepspeed_json, gpu
from pipeline.model import build_model, param_groups
from pipeline.tracking import wandb_mode

DS_CONFIGS = Path(__file__).parent.parent / "ds_configs"
REQUIRED = ["--data-dir", "d", "--deepspeed_config", "c.json"]


def test_a_bool_option_parses_as_one(tmp_path):
    assert config.load(REQUIRED).deepspeed.allow_cpu is False
    assert config.load([*REQUIRED, "--allow-cpu"]).deepspeed.allow_cpu is True
    assert config.load([*REQUIRED, "--allow-cpu", "false"]).deepspeed.allow_cpu is False
    (tmp_path / "run.yaml").write_text("allow-cpu: true\n")
    assert config.load([*REQUIRED, "--config", str(tmp_path / "run.yaml")]).deepspeed.allow_cpu is True
    (tmp_path / "run.yaml").write_text("allow-cpu: maybe\n")
    with pytest.raises(ValueError, match="allow_cpu 'maybe' is not a bool"):
        config.load([*REQUIRED, "--config", str(tmp_path / "run.yaml")])


def test_yaml_then_flags(tmp_path):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("data-dir: /data/in\narch: resnet18\nepochs: 30\nwarmup_epochs: 2\nlabel_smoothing: 0.1\n")
    run = config.load(["--config", str(run_yaml), "--deepspeed_config", "x.json", "--epochs", "40", "--local_rank=3"])
    m, s = run.model, run.schedule
    assert (run.data.data_dir, m.arch, s.epochs, s.warmup_epochs, m.label_smoothing) == (
        "/data/in", "resnet18", 40, 2.0, 0.1)  # fmt: skip
    assert s.schedule == "deepspeed"
    assert run.deepspeed.deepspeed_config == "x.json"
    assert run.data.crop_size == 224
    assert run.checkpoint.resume is None
    run.dump(tmp_path / "config.yaml", schedule={"peak_lr": 3.2})
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert list(saved["run"]) == [
        "data", "deepspeed", "model", "schedule", "loss_scale", "ema", "checkpoint", "tracking", "cluster"]  # fmt: skip
    assert config.RunConfig.from_options(saved["run"]) == run
    assert saved["schedule"] == {"peak_lr": 3.2}
    # A YAML file may also write the sections out; flags still win.
    run_yaml.write_text("data:\n  data-dir: /data/in\n  crop_size: 192\n  data_prefetch: 4\nschedule:\n  epochs: 30\n")
    run = config.load(["--config", str(run_yaml), "--deepspeed_config", "x.json", "--data-threads", "3"])
    assert (run.data.crop_size, run.data.data_threads, run.data.data_prefetch, run.schedule.epochs) == (192, 3, 4, 30)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--deepspeed_config", "c.json"], "--data-dir is required"),
        (["--data-dir", "d"], "--deepspeed_config is required"),
        ([*REQUIRED, "--schedule", "cosine"], "--schedule cosine: use one of deepspeed, goyal_steps"),
        ([*REQUIRED, "--epochs", "5", "--warmup-epochs", "5"], "--warmup-epochs 5.0: must lie in [0, --epochs 5)"),
        ([*REQUIRED, "--val-resize", "200"], "--val-resize 200 is smaller than --crop-size 224"),
        ([*REQUIRED, "--wandb-mode", "cloud"], "--wandb-mode cloud"),
        ([*REQUIRED, "--eval-every", "0"], "--eval-every 0: must be at least 1"),
        ([*REQUIRED, "--label-smoothing", "1.5"], "--label-smoothing 1.5"),
        ([*REQUIRED, "--memory-format", "nhwc"], "--memory-format nhwc: use one of auto, channels_last, contiguous"),
        ([*REQUIRED, "--compile", "fast"], "--compile fast: use one of none, default"),
        ([*REQUIRED, "--hw-decoder-load", "1.5"], "--hw-decoder-load 1.5: must lie in [0, 1]"),
        ([*REQUIRED, "--data-prefetch", "0"], "--data-prefetch 0: must be at least 1"),
    ],
)
def test_bad_options_are_one_line_errors(argv, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        config.load(argv)


def test_yaml_mistakes_name_the_file(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("epoch: 3\n")
    with pytest.raises(ValueError, match=f"--config {bad}: unknown option 'epoch'; known: .*epochs"):
        config.load(["--config", str(bad), *REQUIRED])
    bad.write_text("epochs: three\n")
    with pytest.raises(ValueError, match="epochs 'three' is not a int"):
        config.load(["--config", str(bad), *REQUIRED])
    with pytest.raises(ValueError, match="--deepspeed_config nothing.json: cannot read it as JSON"):
        config.read_ds_config("nothing.json")


def test_wandb_mode_default(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode(None) == "offline"
    assert wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(None) == "online"


def test_grad_accum_from_world_size():
    ds = json.loads((DS_CONFIGS / "bs8k.json").read_text())
    assert [deepspeed_json.grad_accum(ds, "bs8k.json", w) for w in (1, 8, 64, 256)] == [256, 32, 4, 1]
    with pytest.raises(ValueError, match="bs8k.json: train_batch_size 8192 is not a multiple of micro-batch 32 x 3"):
        deepspeed_json.grad_accum(ds, "bs8k.json", 3)


def test_fp16_on_a_cpu_host_stops_unless_allowed_then_becomes_announced_bf16(monkeypatch):
    """DeepSpeed's stock CPU accelerator refuses its fp16 wrapper: --allow-cpu trains in bf16 and says so."""
    monkeypatch.setattr(deepspeed_json, "accelerator_fp16", lambda: False)
    ds = json.loads((DS_CONFIGS / "bs256.json").read_text())
    for name in ("bs256.json", "bs256-autocast.json"):
        committed = json.loads((DS_CONFIGS / name).read_text())
        with pytest.raises(ValueError) as refused:
            deepspeed_json.configure(committed, name, 2, cuda=False)
        # One line: what asked for the GPU, torch's CUDA build, what the driver offers, and the fix.
        line = str(refused.value)
        assert "\n" not in line
        assert line.startswith(f"{name} asks for ")
        assert "CUDA is not usable on this host" in line
        assert gpu.diagnosis() in line
        assert "--allow-cpu" in line
    fitted, notes = deepspeed_json.configure(ds, "bs256.json", 2, cuda=False, allow_cpu=True)
    assert deepspeed_json.precision(fitted) == "bf16"
    assert "data_types" not in fitted
    assert "fused" not in fitted["optimizer"]["params"]
    assert fitted["gradient_accumulation_steps"] == 4
    assert any("--allow-cpu: DeepSpeed's fp16 wrapper needs an accelerator with fp16; this CPU host trains in bf16"
               in n for n in notes)  # fmt: skip
    autocast_ds = json.loads((DS_CONFIGS / "bs256-autocast.json").read_text())
    autocast, notes = deepspeed_json.configure(autocast_ds, "a.json", 2, cuda=False, allow_cpu=True)
    assert deepspeed_json.precision(autocast) == "autocast-fp16"
    assert any("--allow-cpu: autocast-fp16 on this CPU host" in n for n in notes)
    on_gpu, notes = deepspeed_json.configure(ds, "bs256.json", 8, cuda=True)
    assert deepspeed_json.precision(on_gpu) == "fp16"
    assert on_gpu["optimizer"]["params"]["fused"]
    assert notes == []
    assert on_gpu["communication_data_type"] == "fp32"
    assert deepspeed_json.precision(ds) == "fp16"  # the committed configuration is not changed
    # DeepSpeed clips at 1.0 when a configuration says nothing; the recipe does not clip.
    assert fitted["gradient_clipping"] == 0.0
    bare = {k: v for k, v in ds.items() if k not in ("gradient_clipping", "timers", "communication_data_type")}
    fitted, notes = deepspeed_json.configure(bare, "mine.json", 1, cuda=True)
    assert fitted["gradient_clipping"] == 0.0
    assert any("no gradient_clipping given; not clipping" in n for n in notes)
    # DeepSpeed's throughput timer syncs the device twice per micro-step unless a configuration turns it off.
    assert fitted["timers"] == {"throughput": {"enabled": False, "synchronized": False}}
    assert (
        deepspeed_json.configure({**ds, "gradient_clipping": 2.0}, "x.json", 1, cuda=True)[0]["gradient_clipping"]
        == 2.0
    )
    # The wrapper's gradients are all-reduced in fp32 unless a configuration says otherwise.
    assert fitted["communication_data_type"] == "fp32"
    assert any("no communication_data_type given; all-reducing gradients in fp32" in n for n in notes)
    assert (
        deepspeed_json.configure({**ds, "communication_data_type": "fp16"}, "x.json", 1, cuda=True)[0][
            "communication_data_type"
        ]
        == "fp16"
    )
    # The scheduler section is left to DeepSpeed as written (pipeline.schedule fits its step counts to the data).
    assert deepspeed_json.configure(ds, "bs256.json", 1, cuda=True)[0]["scheduler"] == ds["scheduler"]


def test_fp16_on_a_cpu_host_trains_in_fp16_where_deepspeeds_accelerator_allows_it(fp16_cpu):
    bs256 = json.loads((DS_CONFIGS / "bs256.json").read_text())
    fitted, notes = deepspeed_json.configure(bs256, "bs256.json", 2, cuda=False, allow_cpu=True)
    assert deepspeed_json.precision(fitted) == "fp16"
    assert fitted["fp16"]["loss_scale"] == 0
    assert any("--allow-cpu: fp16 on this CPU host" in n for n in notes)


def test_settings_that_cannot_go_together_are_refused_in_one_line():
    ds = {**json.loads((DS_CONFIGS / "bs256.json").read_text()), "gradient_accumulation_steps": 8}
    for mode in deepspeed_json.CUDA_GRAPH_MODES:
        with pytest.raises(ValueError, match=f"--compile {mode} captures CUDA graphs, which cannot accumulate"):
            deepspeed_json.check_combination(ds, "bs256.json", channels_last=False, compile_mode=mode)
    deepspeed_json.check_combination({**ds, "gradient_accumulation_steps": 1}, "x.json", False, "reduce-overhead")
    deepspeed_json.check_combination(ds, "bs256.json", channels_last=True, compile_mode="default")
    zero = {**ds, "zero_optimization": {"stage": 1}}
    with pytest.raises(ValueError, match="x.json: zero_optimization stage 1 cannot keep channels-last weights"):
        deepspeed_json.check_combination(zero, "x.json", channels_last=True, compile_mode="none")
    deepspeed_json.check_combination(zero, "x.json", channels_last=False, compile_mode="none")


def test_autocast_precision_needs_a_dtype():
    assert deepspeed_json.precision({"torch_autocast": {"enabled": True, "dtype": "bf16"}}) == "autocast-bf16"
    assert deepspeed_json.precision({"torch_autocast": {"enabled": False}, "bf16": {"enabled": True}}) == "bf16"
    with pytest.raises(ValueError, match="torch_autocast.dtype None: set it to fp16 or bf16"):
        deepspeed_json.precision({"torch_autocast": {"enabled": True}})


def test_resnet_residual_gammas_start_at_zero():
    model, zeroed = build_model("resnet50", 10)
    bottlenecks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert zeroed == len(bottlenecks) == 16
    assert all(torch.all(b.bn3.weight == 0) for b in bottlenecks)
    assert all(torch.all(b.bn1.weight == 1) for b in bottlenecks)
    small, zeroed = build_model("resnet18", 3, channels_last=True)
    assert zeroed == sum(isinstance(m, BasicBlock) for m in small.modules()) == 8
    assert small.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert build_model("mobilenet_v3_small", 5)[1] == 0
    with pytest.raises(ValueError, match="--arch resnet51: not a torchvision classification model; choose from"):
        build_model("resnet51", 10)


def test_no_weight_decay_on_batch_norm_and_biases():
    model, _ = build_model("resnet18", 10)
    decay, no_decay = param_groups(model, 1e-4)
    assert decay["weight_decay"] == 0.0001
    assert no_decay["weight_decay"] == 0.0
    bn = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert bn | {id(model.fc.bias)} == {id(p) for p in no_decay["params"]}
    convs = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Conv2d)}
    assert {id(p) for p in decay["params"]} == convs | {id(model.fc.weight)}


def test_the_docs_flag_table_is_the_codes():
    """docs/training.md's table of flags is generated from the option fields' comments (python -m pipeline.config),
    as --help is: regenerate it there when an option changes."""
    doc = (Path(__file__).parent.parent / "docs" / "training.md").read_text()
    start, end = "<!-- flags: python -m pipeline.config -->\n", "<!-- end flags -->"
    assert doc[doc.index(start) + len(start) : doc.index(end)] == config.flags_table()
    assert config.flags_table().count("\n| `--") == len(config.option_fields())


def test_blurpool_blurs_before_every_strided_convolution_and_keeps_the_shapes():
    from pipeline.model import BlurPoolConv2d

    plain, _ = build_model("resnet18", 10)
    blurred, zeroed = build_model("resnet18", 10, blurpool=True)
    assert zeroed == 8
    wrapped = [m for m in blurred.modules() if isinstance(m, BlurPoolConv2d)]
    # ResNet-18: the first 3x3 and the shortcut's 1x1 of the first block of stages 2-4; not the RGB stem.
    assert len(wrapped) == 6
    assert all(max(w.conv.stride) == 2 and w.conv.in_channels >= 16 for w in wrapped)
    assert not isinstance(blurred.conv1, BlurPoolConv2d)
    x = torch.randn(2, 3, 64, 64)
    assert blurred(x).shape == plain(x).shape
    # Blur first, then the convolution with its own stride: the [1 2 1]x[1 2 1]/16 filter on each channel,
    # reflect-padded, at stride 1 (the oracle written out here).
    w = wrapped[0]
    inp = torch.randn(1, w.conv.in_channels, 16, 16)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(w.conv.in_channels, 1, 3, 3)
    blur = torch.nn.functional.conv2d(
        torch.nn.functional.pad(inp, (1, 1, 1, 1), mode="reflect"), kernel, groups=w.conv.in_channels
    )
    assert torch.allclose(w(inp), w.conv(blur), atol=1e-5)
    assert not torch.allclose(w(inp), w.conv(inp), atol=1e-3)
    # The weights keep torchvision's names, the wrapped convolutions' under .conv; no buffer is added.
    keys = set(blurred.state_dict())
    assert "layer2.0.conv1.conv.weight" in keys and "layer2.0.downsample.0.conv.weight" in keys
    assert len(keys) == len(plain.state_dict())
