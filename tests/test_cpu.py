"""CPU runs train in bf16 only where the processor computes it natively, in fp32 elsewhere (pipeline/cpu.py): the
capability is read from torch, and both branches are tested with it patched."""

import json
import os
import sys
from pathlib import Path

import pytest

from pipeline import cpu, deepspeed_json, scaling_study
from tests import procs
from tests.runs import ROOT

DS_CONFIGS = ROOT / "ds_configs"
AVX512_BF16 = {"capability": "AVX512", "instructions": {"avx512_bf16"}, "onednn": True}
AVX2 = {"capability": "AVX2", "instructions": set(), "onednn": False}


def as_processor(monkeypatch, capability: str, instructions: set[str], onednn: bool) -> None:
    """Make pipeline.cpu read these from torch."""
    monkeypatch.setattr(cpu, "capability", lambda: capability)
    monkeypatch.setattr(cpu, "instructions", lambda: instructions)
    monkeypatch.setattr(cpu, "onednn", lambda dtype: onednn)


@pytest.mark.parametrize(
    "processor, native",
    [
        (AVX512_BF16, True),
        ({"capability": "AVX512", "instructions": {"amx_bf16"}, "onednn": True}, True),
        # AVX-512 without bf16 instructions (Skylake, Zen 3 has no AVX-512 at all): emulated.
        ({"capability": "AVX512", "instructions": set(), "onednn": True}, False),
        # The instructions, but torch's kernels limited to AVX2 (ATEN_CPU_CAPABILITY=avx2).
        ({"capability": "AVX2", "instructions": {"avx512_bf16"}, "onednn": True}, False),
        # The instructions, but oneDNN limited (ONEDNN_MAX_CPU_ISA=AVX2).
        ({"capability": "AVX512", "instructions": {"avx512_bf16"}, "onednn": False}, False),
        (AVX2, False),
    ],
)
def test_bf16_is_native_only_with_the_instructions_wide_kernels_and_onednn(monkeypatch, processor, native):
    as_processor(monkeypatch, **processor)
    assert cpu.native("bf16") is native
    assert cpu.default_precision() == ("bf16" if native else "fp32")
    assert cpu.described() == f"{processor['capability']}, {'native' if native else 'no native'} bf16"


def test_an_avx2_machine_as_torch_reports_it():
    """On any processor, torch limited to AVX2 (as the slowest CI machine is) reads as no native bf16."""
    code = "from pipeline import cpu; print(cpu.capability(), cpu.native('bf16'), cpu.default_precision())"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    proc = procs.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["AVX2", "False", "fp32"]


def cpu_json() -> dict:
    return json.loads((DS_CONFIGS / "cpu.json").read_text())


def test_cpu_json_trains_in_fp32_without_native_bf16(monkeypatch):
    as_processor(monkeypatch, **AVX2)
    fitted, notes = deepspeed_json.configure(cpu_json(), "cpu.json", 1, cuda=False)
    assert deepspeed_json.precision(fitted) == "fp32"
    assert "bf16" not in fitted
    assert 'cpu.json: bf16 "auto": fp32 on this CPU (AVX2, no native bf16)' in notes
    assert not any("emulated" in n for n in notes)


def test_cpu_json_trains_in_bf16_with_native_bf16(monkeypatch):
    as_processor(monkeypatch, **AVX512_BF16)
    fitted, notes = deepspeed_json.configure(cpu_json(), "cpu.json", 1, cuda=False)
    assert deepspeed_json.precision(fitted) == "bf16"
    assert fitted["bf16"] == {"enabled": True}
    assert 'cpu.json: bf16 "auto": bf16 on this CPU (AVX512, native bf16)' in notes


def test_cpu_json_on_a_gpu_follows_the_gpu(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda: True)
    fitted, notes = deepspeed_json.configure(cpu_json(), "cpu.json", 1, cuda=True)
    assert deepspeed_json.precision(fitted) == "bf16"
    assert 'cpu.json: bf16 "auto": bf16 on this GPU' in notes


@pytest.mark.parametrize("name", ["bs8k-bf16.json", "bs8k-autocast.json"])
def test_a_16_bit_configuration_on_a_cpu_without_it_says_what_to_expect(monkeypatch, name):
    """One note: the capability, the slowdown and the fp32 alternative; the run still trains as asked."""
    as_processor(monkeypatch, **AVX2)
    ds = json.loads((DS_CONFIGS / name).read_text())
    fitted, notes = deepspeed_json.configure(ds, name, 256, cuda=False, allow_cpu=True)
    mode = deepspeed_json.precision(fitted)
    (note,) = [n for n in notes if "emulated" in n]
    assert note == (
        f"{name}: {mode} on a CPU without native {mode.removeprefix('autocast-')} (AVX2): its kernels are emulated, "
        "about 30x slower than fp32; for fp32 use ds_configs/cpu.json or a configuration from python -m "
        "pipeline.scaling --precision fp32"
    )
    as_processor(monkeypatch, **AVX512_BF16)
    _, notes = deepspeed_json.configure(
        json.loads((DS_CONFIGS / "bs8k-bf16.json").read_text()), "b.json", 256, cuda=False
    )
    assert not any("emulated" in n for n in notes)


@pytest.mark.parametrize("processor, precision", [(AVX2, None), (AVX512_BF16, "bf16")])
def test_the_scaling_studys_default_precision_follows_the_processor(monkeypatch, tmp_path, processor, precision):
    as_processor(monkeypatch, **processor)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    argv = [
        "--data-dir",
        "d",
        "--base-batch",
        "32",
        "--batch-sizes",
        "32",
        "--epochs",
        "2",
        "--base-lr",
        "0.1",
        "--out",
        str(tmp_path),
    ]
    args = scaling_study.parse_args(argv)
    run = scaling_study.study_runs(32, [32], [], 0.1, 0.0, False)[0]
    scaling_study.train_command(run, args, tmp_path, "group")
    ds = json.loads(Path(tmp_path / "ds.json").read_text())
    assert ds.get("bf16", {}).get("enabled") is (True if precision else None)
    assert deepspeed_json.precision(ds) == (precision or "fp32")
