# One-command set-up on a fresh machine: `make test` and `make train` create
# the virtualenv (.venv), install the dependencies and adan_plugin, then run.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_QUIET := --quiet --disable-pip-version-check

.PHONY: setup test train clean
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu csrc/*.cuh)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_QUIET) -r requirements.txt 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PY) -c "import torch, timm, mmengine, mmpretrain"
	$(PY) -m pip install $(PIP_QUIET) --no-build-isolation --no-deps -e . 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PY) -c "import adan_plugin"
	touch $@

test: setup
	$(PY) -m pytest -q tests

train: setup
	$(PY) tools/quickstart_digits.py

clean:
	rm -rf $(VENV) build *.egg-info adan_plugin/_C*.so
