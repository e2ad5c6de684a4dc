#!/usr/bin/env bash
# On the lent GPU machine: install the carried wheels (once per machine), then run one step of issue 14's plan.
# Pack them here first (bash bench/gpu/pack.sh), then make the device calls back to back (the machine goes back
# after 30 s idle, and the parts carried earlier go with it):
#
#     carry [".gpu/1"]: true                              (then .gpu/2 and .gpu/3 the same way)
#     carry [".gpu/4"]: bash bench/gpu/run.sh tests numerics       (about 5 minutes: an estimate)
#     bash bench/gpu/run.sh throughput --profile --levers none --deepspeed-config ds_configs/bs256.json
#     bash bench/gpu/run.sh throughput --profile --levers none --deepspeed-config ds_configs/bs256-autocast.json
#     bash bench/gpu/run.sh throughput --levers all --micro-batches 256 --deepspeed-config <the faster mode's>
#
# (ResNet-50 at micro-batches 32/128/256; each measurement is a process of about half a minute, also an estimate.)
#
# Steps, in the order given:
#   tests       the gpu-marked tests (make test-gpu) and the library versions -> <date>-<gpu>-tests.txt
#   numerics    bench/numerics.py on the built-in dataset (built here first): fp32, fp16 wrapper, autocast fp16
#   throughput  bench/throughput.py with the flags that follow (default: every micro-batch, every lever) in the
#               committed fp16 configuration, then in the autocast one (--deepspeed-config to choose one only)
#
# Every result goes to bench/results/ and, as soon as it is written, into $OUT/results.tar (with the log in
# $OUT/log.txt), so a call cut short at its time limit still returns what it measured. Here, afterwards:
#     tar -xf <files_at>/results.tar -C bench/results
set -euo pipefail
cd "$(dirname "$0")/../.."
# PYTHON, SITE and RESULTS are for trying the script where the libraries are installed already (the tests do).
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
OUT=${OUT:-/tmp/out}
RESULTS=${RESULTS:-bench/results}
mkdir -p "$OUT" "$RESULTS"
exec > >(tee -a "$OUT/log.txt") 2>&1

install() {
    test -e "$SITE/.installed" && return
    for i in 1 2 3 4; do
        test -e ".gpu/$i" || { echo "error: .gpu/$i was not carried (bash bench/gpu/pack.sh here, then see above)"; exit 2; }
    done
    local name
    name=$(cut -d' ' -f3 <.gpu/1/dali.sha256)
    cat .gpu/1/dali.part1 .gpu/2/dali.part2 .gpu/3/dali.part3 .gpu/4/dali.part4 >"/tmp/$name"
    (cd /tmp && sha256sum -c "$OLDPWD/.gpu/1/dali.sha256")
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .gpu/1/*.whl "/tmp/$name"
    touch "$SITE/.installed"
}

# The results written since this call began, packed into $OUT every 20 s and at the end.
START=$(mktemp)
collect() {
    (cd "$RESULTS" && find . -type f -newer "$START" | sort | tar -cf "$OUT/results.tar.tmp" -T - &&
        mv "$OUT/results.tar.tmp" "$OUT/results.tar") || true
}
(while sleep 20; do collect; done) </dev/null >/dev/null 2>&1 &
LOOP=$!
trap 'kill $LOOP 2>/dev/null; collect; rm -f "$START"' EXIT

tests() {
    local file
    file="$RESULTS/$(date +%F)-$($PYTHON -c 'from bench.common import machine; from bench.report import device_slug; print(device_slug(machine()))')-tests.txt"
    {
        echo "# make test-gpu on $(hostname), $(date -Is)"
        $PYTHON -c 'import sys, torch, torchvision, deepspeed, nvidia.dali as d; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "torchvision", torchvision.__version__, "deepspeed", deepspeed.__version__, "dali", d.__version__, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
    } >"$file"
    set +e
    # make test-gpu without make install: this machine has no package registry; the carried wheels are the libraries.
    make test-gpu PY="$PYTHON" STAMP= 2>&1 | tee -a "$file"
    local status=${PIPESTATUS[0]}
    set -e
    echo "make test-gpu: exit $status" >>"$file"
}

numerics() {
    local demo=data/demo
    test -d "$demo/raw/train" || $PYTHON -m data_prep.synthetic --out "$demo/raw" --quirks
    test -e "$demo/shards/manifest.json" ||
        $PYTHON -m data_prep.imagenet --src "$demo/raw" --out "$demo/shards" --train-shards 8 --val-shards 4 \
            --workers "$(nproc)"
    $PYTHON bench/numerics.py --data-dir "$demo/shards" --results "$RESULTS" || echo "bench/numerics.py: a check failed (exit $?)"
}

throughput() {
    local configs=(ds_configs/bs256.json ds_configs/bs256-autocast.json) args=("$@") i
    for ((i = 0; i < ${#args[@]}; i++)); do
        if [ "${args[i]}" = --deepspeed-config ]; then
            configs=("${args[i + 1]}")
            unset 'args[i]' 'args[i+1]'
            break
        fi
    done
    for ds in "${configs[@]}"; do
        # Tagged with the configuration: the results of each fp16 mode keep their own files.
        $PYTHON bench/throughput.py --results "$RESULTS" --deepspeed-config "$ds" --tag "$(basename "$ds" .json)" \
            "${args[@]}"
        collect
    done
}

install
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
! command -v nvidia-smi >/dev/null || nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
step=${1:-}
test -n "$step" || { echo "usage: bash bench/gpu/run.sh tests|numerics|throughput [...]"; exit 2; }
while [ $# -gt 0 ]; do
    step=$1
    shift
    case $step in
    tests | numerics)
        "$step"
        collect
        ;;
    throughput)
        throughput "$@"
        exit 0
        ;;
    true) ;;
    *) echo "error: step $step: use tests, numerics or throughput"; exit 2 ;;
    esac
done
