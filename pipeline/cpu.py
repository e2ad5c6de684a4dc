"""What this CPU computes fast: whether it has native bf16 arithmetic, which decides the precision of CPU runs.

bf16 and fp16 kernels are fast only on processors with 16-bit instructions (AVX512-BF16 or AMX: Intel Cooper Lake,
Sapphire Rapids and later, AMD Zen 4 and later). Elsewhere oneDNN emulates them: ResNet-18's forward and backward
pass ran 21 to 39 times slower than in fp32 on a 2-core AMD EPYC with AVX2
(bench/results/2026-12-06-cpu-vm-precision.md). So a CPU run trains in bf16 only where the processor has it, and
in fp32 everywhere else.
"""

from __future__ import annotations

import torch

# What to expect from 16-bit kernels on a CPU without them (measured, see above).
EMULATED_SLOWDOWN = "about 30x slower than fp32"
# The processor features (torch.cpu.get_capabilities()) that make each 16-bit type native on x86 (and Arm).
INSTRUCTIONS = {"bf16": ("avx512_bf16", "amx_bf16", "bf16"), "fp16": ("avx512_fp16", "amx_fp16")}


def capability() -> str:
    """The vector instruction set torch's CPU kernels run with here ("AVX2", "AVX512", ...)."""
    return torch.backends.cpu.get_cpu_capability()


def instructions() -> set[str]:
    """The processor's 16-bit features among INSTRUCTIONS' that it has."""
    wanted = {name for names in INSTRUCTIONS.values() for name in names}
    if hasattr(torch.cpu, "get_capabilities"):
        return {name for name, present in torch.cpu.get_capabilities().items() if name in wanted and present}
    # Older torch: only the x86 bf16 checks.
    found = {"avx512_bf16"} if torch.cpu._is_avx512_bf16_supported() else set()
    return found | ({"amx_bf16"} if torch.cpu._is_amx_tile_supported() else set())


def onednn(dtype: str) -> bool:
    """Whether oneDNN runs `dtype` ("bf16" or "fp16") kernels here (ONEDNN_MAX_CPU_ISA=AVX2 turns them off)."""
    check = (
        torch.ops.mkldnn._is_mkldnn_bf16_supported if dtype == "bf16" else torch.ops.mkldnn._is_mkldnn_fp16_supported
    )
    return bool(check())


def native(dtype: str) -> bool:
    """Whether `dtype` ("bf16" or "fp16") arithmetic runs natively here: the processor has the instructions,
    torch's kernels run with AVX-512 or Arm's SVE (ATEN_CPU_CAPABILITY=avx2 turns that off), and oneDNN uses them."""
    wide = capability().startswith(("AVX512", "SVE"))
    return wide and bool(instructions() & set(INSTRUCTIONS[dtype])) and onednn(dtype)


def described() -> str:
    """This CPU's capability in words, for notes: "AVX2, no native bf16" or "AVX512, native bf16"."""
    return f"{capability()}, {'native' if native('bf16') else 'no native'} bf16"


def default_precision() -> str:
    """The precision a CPU run trains in by default: bf16 where it is native, fp32 elsewhere."""
    return "bf16" if native("bf16") else "fp32"
