#!/usr/bin/env bash
# make gpu-rehearsal: the GPU session's kit tried on this CPU, in an image built like the GPU machine's (a Python 3.12
# venv holding bench/gpu/image.txt's packages, about 4 GB downloaded the first time), before a lent GPU finds
# anything wrong with it:
#   1. bench/gpu/pack.sh packs the kit (.gpu/1-4);
#   2. bench/gpu/session.sh runs there at a CPU's setting (SMALL=1): it installs the carried wheels into a fresh
#      site, imports every module, runs the gpu tests (they skip without a GPU: collected and passing), the
#      numerics, the throughput harness and the extra phase's levers;
#   3. bench/gpu/rehearsal.py writes bench/results/<date>-gpu-rehearsal.md from what came back. Commit it.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=build/gpu-rehearsal
# The GPU image's Python: PY312, else python3.12 on the PATH, else one of pyenv's.
if [ -z "${PY312:-}" ]; then
    for candidate in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
        if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
            PY312=$candidate
            break
        fi
    done
fi
test -n "${PY312:-}" || { echo "error: no Python 3.12 here: install one (pyenv install 3.12) or set PY312"; exit 2; }
PY=${PY:-.venv/bin/python}
mkdir -p "$WORK"
if ! test -e "$WORK/venv/.installed"; then
    rm -rf "$WORK/venv"
    "$PY312" -m venv "$WORK/venv"
    "$WORK/venv/bin/pip" install -q -r bench/gpu/image.txt
    touch "$WORK/venv/.installed"
fi
PY="$PY" bash bench/gpu/pack.sh
rm -rf "$WORK/site" "$WORK/out" "$WORK/results"
began=$SECONDS
PYTHON="$WORK/venv/bin/python" SITE="$WORK/site" OUT="$WORK/out" RESULTS="$WORK/results" SMALL=1 DEMO="$WORK/demo" \
    bash bench/gpu/session.sh || echo "session: exit $?"
"$PY" bench/gpu/rehearsal.py --work "$WORK" --seconds $((SECONDS - began)) --results bench/results
