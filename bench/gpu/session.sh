#!/usr/bin/env bash
# The whole GPU session in one device call, in phases, each in a time box of its own (a hang costs its box, not the
# call), ending inside --budget seconds (default 570: 9.5 minutes). Every result is packed into $OUT/results.tar as
# soon as it is written, so a call cut short still returns figures. Pack the kit here first (bash
# bench/gpu/pack.sh), then make four device calls back to back (the machine goes back after 30 s idle, and the
# parts carried earlier with it):
#
#     carry [".gpu/1"]: true                       (then .gpu/2 and .gpu/3 the same way)
#     carry [".gpu/4"]: bash bench/gpu/session.sh  (timeout_s 600)
#
# Then, here: tar -xf <files_at>/results.tar -C bench/results. A second lent machine continues where the first
# stopped: bash bench/gpu/session.sh --skip bringup,dali,deepspeed (the phases whose results came back).
#
# Phases, in order (box in seconds; each box also ends at the budget):
#   bringup     60   versions, the GPU, every module of the project imported with torch, DeepSpeed and DALI together
#   dali        90   the gpu-marked DALI tests, with the GPU to themselves
#   deepspeed  240   the gpu-marked training tests, then bench/numerics.py: fp32 (TF32 off), the fp16 wrapper and
#                    autocast fp16 compared on top-1, loss-scale skips and growths, and batch-norm statistics
#   throughput 240   ResNet-50 at 224 px in both fp16 modes (bs256, bs256-autocast) at micro-batch 128: the DALI
#                    pipeline alone, synthetic input, end to end, and plain PyTorch AMP, with the step's phases
#   levers     120   the time-to-accuracy levers' cost, synthetic input at micro-batch 128 in the faster fp16 mode:
#                    img/s at 224, 192 and 160 px, BlurPool off and on, the EMA off, every step and every 4th
#   extra      rest  whatever budget remains: micro-batch 256, then channels-last off, then --compile, in the fp16
#                    mode that was faster end to end
#
# SMALL=1 (the rehearsal, make gpu-rehearsal, and the tests) shrinks every setting to a CPU's and measures on the
# built-in dataset's shards; PYTHON, SITE, OUT, RESULTS and DEMO say where the interpreter, the libraries, the
# results and the built-in dataset are.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
OUT=${OUT:-/tmp/out}
RESULTS=${RESULTS:-bench/results}
SMALL=${SMALL:-0}
DEMO=${DEMO:-data/demo}
BUDGET=570
SKIP=""
while [ $# -gt 0 ]; do
    case $1 in
    --skip) SKIP=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    *) echo "error: $1: usage: bash bench/gpu/session.sh [--skip PHASE,...] [--budget SECONDS]"; exit 2 ;;
    esac
done
PHASES="bringup dali deepspeed throughput levers extra"
for phase in ${SKIP//,/ }; do
    case " $PHASES " in *" $phase "*) ;; *) echo "error: --skip $phase: phases are ${PHASES// /, }"; exit 2 ;; esac
done
mkdir -p "$OUT" "$RESULTS"
# Absolute: the packing runs from inside $RESULTS.
OUT=$(cd "$OUT" && pwd) RESULTS=$(cd "$RESULTS" && pwd)
exec > >(tee -a "$OUT/log.txt") 2>&1
BEGAN=$SECONDS

install() {
    test -e "$SITE/.installed" && return 0
    for i in 1 2 3 4; do
        test -e ".gpu/$i" || { echo "error: .gpu/$i was not carried (bash bench/gpu/pack.sh here, then see above)"; exit 2; }
    done
    local name
    name=$(cut -d' ' -f3 <.gpu/1/dali.sha256)
    cat .gpu/1/dali.part1 .gpu/2/dali.part2 .gpu/3/dali.part3 .gpu/4/dali.part4 >"/tmp/$name"
    (cd /tmp && sha256sum -c "$OLDPWD/.gpu/1/dali.sha256") || exit 2
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .gpu/1/*.whl "/tmp/$name" || exit 2
    touch "$SITE/.installed"
}

# The results written since this call began, packed into $OUT every 10 s and after every command.
START=$(mktemp)
collect() {
    (cd "$RESULTS" && find . -type f -newer "$START" | sort | tar -cf "$OUT/results.tar.tmp" -T - &&
        mv "$OUT/results.tar.tmp" "$OUT/results.tar") || true
}
(while sleep 10; do collect; done) </dev/null >/dev/null 2>&1 &
LOOP=$!
trap 'kill $LOOP 2>/dev/null; collect; rm -f "$START"' EXIT

# boxed NAME COMMAND...: run COMMAND within what is left of the phase's box and of the budget; log its time.
boxed() {
    local name=$1 left=$((PHASE_END - SECONDS)) budget=$((BEGAN + BUDGET - SECONDS))
    shift
    ((budget < left)) && left=$budget
    if ((left < 5)); then
        echo "[$name] skipped: no time left in the box"
        echo "$PHASE $name skipped" >>"$RESULTS/$STEM-session.txt"
        return 1
    fi
    local began=$SECONDS status
    echo "[$name] up to ${left}s: $*"
    timeout -k 10 "$left" "$@"
    status=$?
    ((status == 124)) && echo "[$name] stopped at its box (${left}s)"
    echo "$PHASE $name exit $status in $((SECONDS - began))s" >>"$RESULTS/$STEM-session.txt"
    collect
    return $status
}

phase() {
    PHASE=$1
    PHASE_END=$((SECONDS + $2))
    case ",$SKIP," in *",$1,"*) echo "== $1: skipped (--skip)"; return 1 ;; esac
    echo "== $1 (box $2 s, $((BEGAN + BUDGET - SECONDS)) s of the budget left)"
}

install
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
STEM="$(date +%F)-$($PYTHON -c 'from bench.common import machine; from bench.report import device_slug; print(device_slug(machine()))' 2>/dev/null || echo unknown)"
echo "# session on $(hostname), $(date -Is), budget ${BUDGET}s, skip: ${SKIP:-none}" >>"$RESULTS/$STEM-session.txt"
if ((SMALL)); then
    # A CPU's setting: the same steps, small enough to end in minutes, on the built-in dataset.
    MODEL=(--arch resnet18 --crop-size 32 --data-dir "$DEMO/shards" --window 2 --windows 2 --data-threads 2)
    # cpu.json's precision (bf16 where native, else fp32) at a batch of 16.
    $PYTHON -m pipeline.scaling --batch-size 16 --micro-batch 8 --precision auto --no-fused --out "$OUT/small.json" ||
        exit 2
    FIRST=8 SECOND=16 WHOLE=16 CONFIGS=("$OUT/small.json")
    # fp32 and one 16-bit mode (bf16: it runs on any CPU), ShuffleNet at 32 px (16-bit may be emulated here);
    # loose tolerances: one epoch says nothing of accuracy, the checks themselves are what is tried (and a layer
    # whose fp32 running means are near 0, as on ShuffleNet's last 1x1 maps at 32 px, makes their relative size
    # meaningless here).
    NUMERICS=(--modes fp32,bf16 --arch shufflenet_v2_x0_5 --crop-size 32 --val-resize 40 --epochs 1
        --warmup-epochs 0 --batch 16 --micro-batch 8 --top1-tolerance 100 --bn-tolerance 1e6)
else
    # WHOLE: bs256's whole batch in one micro-batch, where CUDA graphs (--compile reduce-overhead) may run.
    MODEL=(--arch resnet50 --crop-size 224 --images 25600 --window 10 --windows 4)
    FIRST=128 SECOND=256 WHOLE=256 CONFIGS=(ds_configs/bs256.json ds_configs/bs256-autocast.json)
    NUMERICS=()
fi

demo_data() {
    test -e "$DEMO/shards/manifest.json" || boxed demo-data bash -c "
        $PYTHON -m data_prep.synthetic --out $DEMO/raw --quirks &&
        $PYTHON -m data_prep.imagenet --src $DEMO/raw --out $DEMO/shards --train-shards 8 --val-shards 4 --workers $(nproc)"
}

if phase bringup 60; then
    ! command -v nvidia-smi >/dev/null ||
        boxed nvidia-smi nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
    boxed imports $PYTHON bench/gpu/bringup.py --out "$RESULTS/$STEM-bringup.txt"
fi

if phase dali 90; then
    boxed dali-tests $PYTHON -m pytest -q -p no:cacheprovider -m gpu tests/test_data_gpu.py \
        --junitxml "$RESULTS/$STEM-dali-tests.xml"
fi

if phase deepspeed 240; then
    boxed deepspeed-tests $PYTHON -m pytest -q -p no:cacheprovider -m gpu tests/test_train_gpu.py \
        --junitxml "$RESULTS/$STEM-deepspeed-tests.xml"
    demo_data
    boxed numerics $PYTHON bench/numerics.py --data-dir "$DEMO/shards" --results "$RESULTS" "${NUMERICS[@]}"
fi

throughput() {  # NAME CONFIG [bench/throughput.py flags]
    local name=$1 ds=$2
    shift 2
    boxed "$name" $PYTHON bench/throughput.py --results "$RESULTS" --deepspeed-config "$ds" \
        --tag "$(basename "$ds" .json)$name" "${MODEL[@]}" "$@"
}

if phase throughput 240; then
    ((SMALL)) && demo_data
    for ds in "${CONFIGS[@]}"; do
        throughput "" "$ds" --micro-batches "$FIRST" --levers none --profile
    done
fi

if phase levers 120; then
    best=$($PYTHON bench/gpu/faster.py "$RESULTS" "${CONFIGS[@]}")
    throughput -levers "$best" --micro-batches none --lever-micro-batch "$FIRST" --levers crop_size,blurpool,ema
fi

if phase extra $((BUDGET)); then
    # In the fp16 mode that was faster end to end at the first micro-batch (the first one without figures).
    best=$($PYTHON bench/gpu/faster.py "$RESULTS" "${CONFIGS[@]}")
    throughput -mb$SECOND "$best" --micro-batches "$SECOND" --levers none
    throughput -memory-format "$best" --micro-batches none --lever-micro-batch "$FIRST" --levers memory_format
    throughput -compile "$best" --micro-batches none --lever-micro-batch "$WHOLE" --levers compile
fi
echo "session: $((SECONDS - BEGAN)) s of the ${BUDGET} s budget"
