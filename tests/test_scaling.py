"""The linear scaling rule and the committed DeepSpeed configurations it generates."""

import json
from pathlib import Path

import pytest

from pipeline import scaling
from tests.runs import run_module

DS_CONFIGS = Path(__file__).parent.parent / "ds_configs"


def test_committed_configs_equal_the_generator_output():
    assert scaling.stale_files(DS_CONFIGS) == []
    assert sorted(p.stem for p in DS_CONFIGS.glob("*.json")) == sorted(scaling.CONFIGS)


@pytest.mark.parametrize(
    "name, lr, warmup, total, precision",
    [
        # ceil(1,281,167 / B) steps per epoch; 5 epochs of warmup; 90 epochs in all.
        ("bs256", 0.1, 5 * 5005, 90 * 5005, "fp16"),
        ("bs1k", 0.4, 5 * 1252, 90 * 1252, "fp16"),
        ("bs8k", 3.2, 5 * 157, 90 * 157, "fp16"),
        ("bs8k-bf16", 3.2, 5 * 157, 90 * 157, "bf16"),
    ],
)
def test_config_numbers_follow_the_paper(name, lr, warmup, total, precision):
    """The committed file holds the batch, the peak lr, the optimizer and the design's schedule: DeepSpeed's
    WarmupDecayLR, linear from 0 to the peak over 5 epochs, then linearly to 0 at the end of epoch 90."""
    ds = json.loads((DS_CONFIGS / f"{name}.json").read_text())
    assert ds["scheduler"] == {
        "type": "WarmupDecayLR",
        "params": {
            "warmup_min_lr": 0.0,
            "warmup_max_lr": pytest.approx(lr),
            "warmup_num_steps": warmup,
            "total_num_steps": total,
            "warmup_type": "linear",
        },
    }
    assert ds["optimizer"]["params"]["lr"] == pytest.approx(lr)
    recipe = scaling.CONFIGS[name]
    assert (recipe.warmup_steps, recipe.total_steps) == (warmup, total)
    assert ds["train_micro_batch_size_per_gpu"] == 32
    assert "gradient_accumulation_steps" not in ds
    sgd = ds["optimizer"]["params"]
    assert (ds["optimizer"]["type"], sgd["momentum"], sgd["nesterov"], sgd["weight_decay"], sgd["fused"]) == (
        "SGD", 0.9, True, 1e-4, True)  # fmt: skip
    assert ds.get(precision, {}).get("enabled") is True
    # The wrappers all-reduce their gradients in fp32 (batch norm's are fp32).
    assert ds["communication_data_type"] == "fp32"
    if precision == "fp16":
        assert ds["fp16"]["loss_scale"] == 0  # dynamic


def test_cpu_config_is_small_unfused_and_bf16_only_where_it_is_native():
    ds = json.loads((DS_CONFIGS / "cpu.json").read_text())
    assert ds["train_batch_size"] == 64
    assert ds["bf16"] == {"enabled": "auto"}
    assert "fp16" not in ds
    assert "fused" not in ds["optimizer"]["params"]
    assert ds["optimizer"]["params"]["lr"] == 0.025
    # B = 64 warms up too, from 0 (the paper's warmup from 0.1 has nothing to do at or below B = 256).
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 5 * 20019


def test_check_command_finds_an_edited_file(tmp_path):
    assert run_module("pipeline.scaling", "--out", str(tmp_path), check=True).returncode == 0
    assert run_module("pipeline.scaling", "--check", str(tmp_path)).returncode == 0
    edited = json.loads((tmp_path / "bs8k.json").read_text())
    edited["optimizer"]["params"]["nesterov"] = False
    (tmp_path / "bs8k.json").write_text(json.dumps(edited))
    proc = run_module("pipeline.scaling", "--check", str(tmp_path))
    assert proc.returncode == 1
    assert "bs8k.json: differs" in proc.stderr
    assert "bs1k" not in proc.stderr


def test_custom_config_and_bad_batch(tmp_path):
    out = tmp_path / "b4k.json"
    proc = run_module("pipeline.scaling", "--batch-size", "4096", "--precision", "bf16", "--out", str(out), check=True)
    ds = json.loads(out.read_text())
    assert ds["optimizer"]["params"]["lr"] == 1.6
    assert ds["bf16"]["enabled"] is True
    assert "warmup 1565 of 28170 steps" in proc.stdout
    proc = run_module("pipeline.scaling", "--batch-size", "100", "--out", str(out))
    assert proc.returncode == 2
    assert "not a positive multiple of the micro-batch 32" in proc.stderr
