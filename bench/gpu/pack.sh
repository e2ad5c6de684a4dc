#!/usr/bin/env bash
# Pack what the lent GPU machine lacks (DeepSpeed, DALI for CUDA 13, their small dependencies) into
# .gpu/1 .. .gpu/4, each under 60 MB so that one travels per device call (`carry`). Run here, where
# PyPI answers; the device image already has torch 2.11 (cu130), torchvision, timm, pyyaml, tqdm, numpy.
#
#     bash bench/gpu/pack.sh          then carry .gpu/1, .gpu/2, .gpu/3, .gpu/4 in four calls back to back,
#                                     the last one running `bash bench/gpu/session.sh` (see its header)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
DS_VERSION=$($PY -c "from importlib.metadata import version; print(version('deepspeed'))")
DALI_VERSION=$($PY -c "from importlib.metadata import version; print(version('nvidia-dali-cuda120'))")
PLATFORM="--only-binary=:all: --python-version 3.12 --implementation cp"
for p in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 \
    manylinux_2_5 manylinux1; do
    PLATFORM="$PLATFORM --platform ${p}_x86_64"
done
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/1 .gpu/2 .gpu/3 .gpu/4
# .gpu/ travels only as a carried path, so git must ignore it (a fresh clone may have no .git/info yet).
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >>"$exclude"
# DeepSpeed is published as a source archive: its wheel (pure Python, ops built on first use) is built here.
$PY -m pip wheel -q --no-deps -w .gpu/1 "deepspeed==$DS_VERSION"
# Missing from the image, or not sure to be there (the rehearsal's image holds only torch, torchvision, timm,
# pytest and numpy, with what they need): DeepSpeed's hjson, pydantic, psutil, msgpack and einops; DALI's own needs
# (six through astunparse); the CUDA 13 nvJPEG and nvImageCodec libraries DALI decodes with; crc32c and protobuf
# for the shard format; simple-parsing (and docstring-parser) for the run options; pytest-timeout for the suite's
# time limits. Versions from requirements.lock where it has one.
lock() { grep -i "^$1==" requirements.lock; }
$PY -m pip download -q --no-deps $PLATFORM -d .gpu/1 hjson pydantic==2.14.3 pydantic-core==2.50.4 \
    annotated-types typing-inspection "typing-extensions>=4.16" crc32c astunparse gast makefun nvtx optree \
    "libcst~=1.8" "nvidia-nvjpeg>=13,<14" "nvidia-nvimgcodec-cu13>=0.9,<0.10" "$(lock six)" "$(lock psutil)" \
    "$(lock msgpack)" "$(lock einops)" "$(lock protobuf)" "$(lock pytest-timeout)" "$(lock simple-parsing)" \
    "$(lock docstring_parser)"
$PY -m pip download -q --no-deps $PLATFORM -d .gpu/wheels "nvidia-dali-cuda130==$DALI_VERSION"
DALI=$(ls .gpu/wheels/nvidia_dali_cuda130-*.whl)
# The DALI wheel (~200 MB) in parts: the first fills .gpu/1 up to 58 MB, the others take 58 MB each.
first=$((58 * 1024 * 1024 - $(du -sb .gpu/1 | cut -f1)))
head -c "$first" "$DALI" >.gpu/1/dali.part1
tail -c +"$((first + 1))" "$DALI" | split -b 58M -d -a 1 - .gpu/dali.part
for i in 0 1 2; do mv ".gpu/dali.part$i" ".gpu/$((i + 2))/dali.part$((i + 2))"; done
test ! -e .gpu/dali.part3 || { echo "error: the DALI wheel needs more than 4 parts"; exit 1; }
(cd .gpu/wheels && sha256sum "$(basename "$DALI")") >.gpu/1/dali.sha256
rm -rf .gpu/wheels
du -sh .gpu/*
