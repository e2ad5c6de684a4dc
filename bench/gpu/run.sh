#!/usr/bin/env bash
# On the lent GPU machine: install the carried wheels (once per machine) and run the throughput harness.
#
#     device run, carry [".gpu/1"]: true            (then .gpu/2 and .gpu/3 the same way, back to back)
#     device run, carry [".gpu/4"]: bash bench/gpu/run.sh [bench/throughput.py flags]
#
# The flags go to bench/throughput.py (default: every micro-batch, no levers; e.g. --levers compile,log_every
# --micro-batches 256 for a second call). Results and the log are copied to $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
SITE=/tmp/site
if [ ! -e "$SITE/.installed" ]; then
    for i in 1 2 3 4; do test -e ".gpu/$i" || { echo "error: .gpu/$i was not carried (bash bench/gpu/pack.sh here)"; exit 2; }; done
    name=$(cut -d' ' -f3 <.gpu/1/dali.sha256)
    cat .gpu/1/dali.part1 .gpu/2/dali.part2 .gpu/3/dali.part3 .gpu/4/dali.part4 >"/tmp/$name"
    (cd /tmp && sha256sum -c "$OLDPWD/.gpu/1/dali.sha256")
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .gpu/1/*.whl "/tmp/$name"
    touch "$SITE/.installed"
fi
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
set -o pipefail
python3 bench/throughput.py --levers none --results "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
