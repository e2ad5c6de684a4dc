"""The rehearsal's summary (make gpu-rehearsal, bench/gpu/rehearse.sh): what the GPU session did in an image built like
the GPU machine's, on this CPU, written to bench/results/<date>-gpu-rehearsal.md.

    python bench/gpu/rehearsal.py --work build/gpu-rehearsal --seconds S [--results bench/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench.common import machine  # noqa: E402
from bench.report import device_name  # noqa: E402


def image_packages(venv: Path) -> list[str]:
    """The rehearsal image's packages, as pip lists them (name==version)."""
    proc = subprocess.run([str(venv / "bin" / "pip"), "freeze"], capture_output=True, text=True)
    return sorted(proc.stdout.split(), key=str.lower)


def tests_line(xml: Path) -> str:
    """'N collected: P passed, S skipped, F failed' from a pytest JUnit file."""
    suite = ElementTree.parse(xml).getroot().find("testsuite")
    tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    failed = int(suite.get("failures")) + int(suite.get("errors"))
    return f"{tests} collected: {tests - skipped - failed} passed, {skipped} skipped, {failed} failed"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--seconds", type=int, required=True, help="the session's wall time")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    work, results = Path(args.work), Path(args.work) / "results"
    packages = image_packages(work / "venv")
    pick = ("torch==", "torchvision==", "timm==", "pytest==", "numpy==")
    parts = {d.name: sum(f.stat().st_size for f in d.iterdir()) for d in sorted((ROOT / ".gpu").iterdir())}
    session = next(results.glob("*-session.txt")).read_text().splitlines()
    bringup = next(results.glob("*-bringup.txt")).read_text().splitlines()
    date = datetime.date.today().isoformat()
    lines = [
        f"# GPU kit rehearsal, {date}",
        "",
        f"`make gpu-rehearsal` (bench/gpu/rehearse.sh) on {device_name(machine())}: the GPU session "
        "(`bash bench/gpu/session.sh`, at a CPU's setting: SMALL=1) in a Python "
        f"{bringup[0].split()[1]} venv holding only `bench/gpu/image.txt`'s packages "
        f"({', '.join(x for x in packages if x.startswith(pick))}; {len(packages)} with what they need), the kit "
        "installed from its carried parts into a fresh site.",
        "",
        "Kit parts (each travels in one device call; the limit is 64 MiB with the working tree): "
        + ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in parts.items())
        + ".",
        "",
        "Bring-up: " + " ".join(bringup[:1]) + "; " + bringup[-1] + ".",
        "",
        "| phase | step | result |",
        "|---|---|---|",
    ]
    for line in session[1:]:
        phase, rest = line.split(" ", 1)
        step, _, outcome = (
            rest.rpartition(" exit ") if " exit " in rest else (rest.removesuffix(" skipped"), "", "skipped")
        )
        lines.append(
            f"| {phase} | {step or '(harness)'} | {'exit ' + outcome if outcome != 'skipped' else 'skipped'} |"
        )
    for name in ("dali", "deepspeed"):
        for xml in results.glob(f"*-{name}-tests.xml"):
            lines += ["", f"{name} gpu tests: {tests_line(xml)} (no GPU here)."]
    for path in sorted(results.glob("*-small*.json")):
        result = json.loads(path.read_text())
        if result.get("rows"):
            row = result["rows"][0]
            lines += [
                "",
                f"Throughput harness ({path.name}): end to end {row['end_to_end_img_s']:.0f} img/s, "
                f"synthetic {row['synthetic_img_s']:.0f}, plain AMP {row['baseline_amp_img_s']:.0f}, DALI alone "
                f"{row['dali_pipeline_img_s']:.0f} ({result['model']} at {result['crop_size']} px, "
                f"{result['precision']}, micro-batch {row['micro_batch']}; a CPU: the figures say the harness "
                "runs, nothing about a GPU).",
            ]
    lines += ["", f"The session took {args.seconds} s here.", ""]
    out = Path(args.results) / f"{date}-gpu-rehearsal.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
