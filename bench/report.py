"""A throughput result in words: FLOP per image, the device's name, the verdicts against the targets, and the
markdown table the README shows."""

from __future__ import annotations

import re

import torch

from bench.children import PHASES

# The targets on one H100/H200, ResNet-50 fp16.
TARGET_IMG_S, TARGET_DATA_SHARE, TARGET_VS_AMP = 3000, 0.95, 0.95
# The bf16/fp16 matrix rate measured on an H100 (shared/method.md): the arithmetic ceiling.
HOPPER_MATRIX_FLOP_S = 790e12


def train_flop(arch: str, crop: int) -> float:
    """Multiply-add FLOP of one training image (forward and backward, about 3x the forward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.model import build_model

    model, _ = build_model(arch, 1000)
    model.eval()  # one image: batch norm cannot train on it, and its FLOP are the same
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, crop, crop))
    return 3.0 * counter.get_total_flops()


def device_name(info: dict) -> str:
    """The machine in words for the results: the GPU's name, or the CPU's with its cores."""
    capability = f", {info['cpu_capability']}" if info.get("cpu_capability") else ""
    return info["gpu"] or f"CPU only ({info['cpu']}, {info['cores']} cores{capability})"


def device_slug(info: dict) -> str:
    """The results' file name part for this machine: the GPU's name, or cpu-<host>."""
    name = info["gpu"] or f"cpu-{info['host']}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def verdicts(result: dict) -> list[str]:
    """The issue's three targets, judged on the best end-to-end row (on a GPU)."""
    best = result["best"]
    if best is None:
        return ["No micro-batch measured (--micro-batches none: the levers alone)."]
    e2e, share, vs_amp = best["end_to_end_img_s"], best["end_to_end_vs_synthetic"], best["deepspeed_vs_amp"]
    if not result["gpu"]:
        return ["Targets are for one H100/H200 GPU: not judged on a CPU."]

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    return [
        f"end to end >= {TARGET_IMG_S:,} img/s: {e2e:,.0f} ({met(e2e >= TARGET_IMG_S)})",
        f"end to end >= {TARGET_DATA_SHARE} of synthetic: {share:.3f} ({met(share >= TARGET_DATA_SHARE)})",
        f"DeepSpeed >= {TARGET_VS_AMP} of plain AMP: {vs_amp:.3f} ({met(vs_amp >= TARGET_VS_AMP)})",
    ]


def markdown(result: dict) -> str:
    """The results as README-ready tables."""
    m = result["machine"]
    host = f"; host {m['cpu']} ({m['cores']} cores)" if result["gpu"] else ""
    lines = [
        f"# Training throughput, {result['date']}",
        "",
        f"{result['device']}{host}; torch {m.get('torch')}, DeepSpeed "
        f"{result['versions']['deepspeed']}, DALI {result['versions']['dali']}. {result['model']} at "
        f"{result['crop_size']} px, {result['precision']}, batch {result['train_batch_size']} per optimizer step "
        f"(micro-batch x accumulation), {result['train_images']} training JPEGs of 500x375. Median images/s of "
        f"{result['windows']} windows of {result['window']} optimizer steps after {result['warmup_steps']} warm-up "
        f"steps, in each of {result['repeats']} run(s) per measurement. Command: "
        f"`{result['command']}`.",
        "",
        "| micro-batch | DALI pipeline alone | synthetic input (DeepSpeed) | end to end | plain PyTorch AMP "
        "| end to end / synthetic | DeepSpeed / AMP | model TFLOP/s (synthetic) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if not result["rows"]:
        lines = lines[:-3]
    for r in result["rows"]:
        lines.append(
            f"| {r['micro_batch']} | {r['dali_pipeline_img_s']:,.0f} | {r['synthetic_img_s']:,.0f} | "
            f"{r['end_to_end_img_s']:,.0f} | {r['baseline_amp_img_s']:,.0f} | {r['end_to_end_vs_synthetic']:.3f} | "
            f"{r['deepspeed_vs_amp']:.3f} | {r['synthetic_img_s'] * result['train_flop'] / 1e12:.1f} |"
        )
    lines += ["", *[f"- {v}" for v in verdicts(result)]]
    phased = [r for r in result["rows"] if "phases_ms" in r]
    if phased:
        lines += [
            "",
            "Where an optimizer step's time goes (ms; each phase ends in a device sync, so no overlap):",
            "",
            "| micro-batch | engine | forward | backward | optimizer step | sum |",
            "|---|---|---|---|---|---|",
        ]
        for r in phased:
            for name, p in r["phases_ms"].items():
                cells = " | ".join(f"{p[k]:.1f}" for k in PHASES)
                lines.append(f"| {r['micro_batch']} | {name} | {cells} | {sum(p.values()):.1f} |")
    if result["levers"]:
        lines += [
            "",
            f"Levers at micro-batch {result['lever_micro_batch']}, each against its first setting:",
            "",
            "| lever | measured | setting | images/s | vs first |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {x['lever']} | {x['mode']} | {x['setting']} | {x['img_s']:,.0f} | {x['vs_default']:.3f} |"
            for x in result["levers"]
        ]
    for note in result["notes"]:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"
