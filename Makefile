# Every target installs what it needs first: on a fresh machine `make demo` or `make test` is enough.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# make prep-imagenet IMAGENET_DIR=/data/imagenet DATA_DIR=/data/imagenet-tfrecord [TRAIN_SHARDS=.. VAL_SHARDS=.. WORKERS=..]
# IMAGENET_DIR holds train/ and val/, or image-net.org's two tars and devkit (or Kaggle's zip), read in place.
IMAGENET_DIR ?=
DATA_DIR ?= data/imagenet-tfrecord
TRAIN_SHARDS ?= 1024
VAL_SHARDS ?= 128
WORKERS ?= $(shell nproc)
DEMO_DIR ?= data/demo

.PHONY: install lock test test-fast test-hosts test-gpu gpu-rehearsal lint demo demo-data scaling-study bench bench-prep \
	bench-data bench-throughput bench-cpu-precision bench-time-to-accuracy prep-imagenet clean

install: $(STAMP)

# The stamp makes a second `make install` free; editing pyproject.toml or the lock reinstalls. The versions are
# the lock's (requirements.lock): the ones the tests passed with, the same on every node of a job.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -c requirements.lock -e '.[dev]'
	touch $@

# Re-resolve pyproject.toml's ranges in a fresh environment and rewrite the lock; then make test, and commit both.
lock:
	rm -rf build/lock-venv
	$(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/pip install -q -e '.[dev]'
	{ sed -n '1,2p' requirements.lock; build/lock-venv/bin/pip freeze --exclude-editable | grep -v '^-e'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock
	rm -rf build/lock-venv

# The CPU suite, as CI runs it. On a GPU host the GPUs are hidden, so it tests the CPU path there too;
# make test-gpu runs the gpu-marked tests on the GPU.
test: install test-hosts
	CUDA_VISIBLE_DEVICES= $(PY) -m pytest -q

# The multi-node tests' hosts (tests/hosts.py): network namespaces, each with an sshd (pdsh, mpirun) and a slurmd
# (SLURM with munge); Open MPI's mpirun.
test-hosts:
	@test -x /usr/sbin/sshd && command -v pdsh >/dev/null && command -v ip >/dev/null && command -v slurmd \
		>/dev/null && command -v munged >/dev/null && command -v mpirun >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server pdsh iproute2 slurm-wlm munge openmpi-bin; }

# The edit loop: everything but the end-to-end runs (about 20 s on 2 cores).
test-fast: install test-hosts
	CUDA_VISIBLE_DEVICES= $(PY) -m pytest -q -m "not slow"

test-gpu: install
	$(PY) -m pytest -q -m gpu

# The GPU session's kit (bench/gpu/), tried on this CPU in an image built like the GPU machine's (a Python 3.12 venv
# with only its packages: about 4 GB downloaded the first time); writes bench/results/<date>-gpu-rehearsal.md.
gpu-rehearsal: install
	PY=$(PY) bash bench/gpu/rehearse.sh

# The formatter owns the layout: no library code keeps a line from it (tests/test_lint.py runs this in the suite).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@! grep -rn --include='*.py' -e '# fmt: skip' -e '# fmt: off' pipeline data_prep bench

# The built-in dataset, prepared and verified (idempotent: a second call only re-checks).
demo-data: install
	@test -d $(DEMO_DIR)/raw/train || $(PY) -m data_prep.synthetic --out $(DEMO_DIR)/raw --quirks
	$(PY) -m data_prep.imagenet --src $(DEMO_DIR)/raw --out $(DEMO_DIR)/shards --train-shards 8 --val-shards 4 \
		--workers $(WORKERS)
	$(PY) -m data_prep.verify $(DEMO_DIR)/shards --full

demo: demo-data
	$(PY) -m pipeline.data.preview --data-dir $(DEMO_DIR)/shards --split train --num 16 --out $(DEMO_DIR)/preview-train.png
	$(PY) -m pipeline.data.preview --data-dir $(DEMO_DIR)/shards --split validation --num 16 \
		--out $(DEMO_DIR)/preview-validation.png
	@# A fresh run each time: ResNet-18 at 64 px, 8 epochs, on the GPU when there is one (about 2 minutes on 2 CPU
	@# cores); cpu.json trains in bf16 where the processor has bf16 instructions, in fp32 elsewhere.
	rm -rf $(DEMO_DIR)/run
	$(PY) pipeline/train.py --deepspeed_config ds_configs/cpu.json --data-dir $(DEMO_DIR)/shards --arch resnet18 \
		--crop-size 64 --val-resize 73 --epochs 8 --warmup-epochs 1 --out-dir $(DEMO_DIR)/run

# Goyal et al.'s figure on the built-in dataset: B=32 against 256 and 1024 (rule+warmup, rule, no-rule, LARS).
STUDY_DIR ?= $(DEMO_DIR)/scaling-study
scaling-study: demo-data
	$(PY) -m pipeline.scaling_study --data-dir $(DEMO_DIR)/shards --base-batch 32 --batch-sizes 32,256,1024 \
		--epochs 16 --warmup-epochs 2 --crop-size 64 --val-resize 73 --lars --out $(STUDY_DIR)

bench: bench-prep bench-data bench-throughput bench-cpu-precision bench-time-to-accuracy

# How much slower 16-bit kernels run than fp32 on this CPU (what ds_configs/cpu.json's "bf16": "auto" rests on).
bench-cpu-precision: install
	$(PY) bench/cpu_precision.py

bench-prep: install
	$(PY) bench/prep_bench.py

# The training input pipeline alone, DALI next to torchvision (on the GPU when there is one).
bench-data: install
	$(PY) bench/data_bench.py

# Training throughput: DALI alone, synthetic input, end to end, plain PyTorch AMP, per micro-batch, and the
# speed levers (ResNet-50 fp16 at 32/128/256 on a GPU; a small ResNet-18 setting on a CPU, in cpu.json's precision).
bench-throughput: install
	$(PY) bench/throughput.py

# Time to accuracy on a CPU proxy: the paper-style baseline against FFCV's levers, and each lever alone
# (docs/recipes.md; about 17 minutes on 2 cores).
bench-time-to-accuracy: install
	$(PY) bench/time_to_accuracy.py

prep-imagenet: install
	@test -n "$(IMAGENET_DIR)" || { echo "error: set IMAGENET_DIR=/path/to/imagenet (the folder holding train/ and val/, or the downloads: ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar, ILSVRC2012_devkit_t12.tar.gz)"; exit 2; }
	$(PY) -m data_prep.imagenet --src $(IMAGENET_DIR) --out $(DATA_DIR) --train-shards $(TRAIN_SHARDS) \
		--val-shards $(VAL_SHARDS) --workers $(WORKERS)

clean:
	rm -rf $(VENV) data/demo bench/work build .gpu .pytest_cache .ruff_cache
