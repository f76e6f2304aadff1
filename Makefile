# One-command set-up on a fresh machine: `make test` and `make train` create
# the virtualenv (.venv), install the dependencies and adan_plugin, then run.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_QUIET := --quiet --disable-pip-version-check

.PHONY: setup test train lowmem-accuracy clean
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu csrc/*.cuh)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_QUIET) -r requirements.txt 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PY) -c "import torch, timm, mmengine, mmpretrain"
	$(PY) -m pip install $(PIP_QUIET) --no-build-isolation --no-deps -e . 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PY) -c "import adan_plugin"
	# The fused kernels must have been built (CPU always; CUDA when nvcc and a CUDA
	# torch are present), so that a compile error or a silent skip fails `make`.
	$(PY) -c "import os, shutil, torch; from adan_plugin import _ext; \
	  off = os.environ.get('ADAN_NO_EXT') == '1'; \
	  assert off or _ext.extension_loaded(), f'adan_plugin._C did not load: {_ext.load_error()}'; \
	  cuda = not off and os.environ.get('ADAN_NO_CUDA') != '1' and torch.version.cuda and shutil.which('nvcc'); \
	  assert not cuda or torch.ops.adan_plugin._has_cuda(), 'adan_plugin._C was built without its CUDA kernels'"
	touch $@

test: setup
	$(PY) -m pytest -q tests

# Main job: a timm model trained with Adan on the embedded digits (CPU, a few minutes); prints
# top-1 and plots output/demo_digits/summary.png.  `make train TRAIN_ARGS=--compare-adamw` then
# reruns the recipe with AdamW and plots both curves (output/demo_digits/adan_vs_adamw.png).
TRAIN_ARGS ?=
train: setup
	$(PY) tools/train_timm.py --config configs/timm/demo/digits_test_resnet.yaml \
		--output output/demo_digits --log-interval 1000 $(TRAIN_ARGS)

# Accuracy of 8-bit Adan states and Kahan-compensated bf16 parameters against fp32 Adan (issue 11):
# 3 seeds x every configuration on the digits demo and a small ViT (CPU, about 30 single-thread
# minutes; runs already in output/lowmem_accuracy/results.jsonl are kept), then rewrites
# docs/lowmem_accuracy.md and .png.  LOWMEM_ARGS=--fresh reruns everything.
LOWMEM_ARGS ?= --jobs 2
lowmem-accuracy: setup
	$(PY) tools/lowmem_accuracy.py $(LOWMEM_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info adan_plugin/_C*.so
