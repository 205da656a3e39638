# Targets create .venv when missing and install the project into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?= clip
NPROC ?=

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# DeepSpeed JIT-builds its CPU shared-memory comm op on first use; keep that build (and its lock
# file) inside this venv so a stale lock from another checkout can never make ranks wait forever.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

# img2dataset (the URL downloader of `vlp data convert`) cannot share .venv: it requires webdataset<0.3, vlp
# webdataset>=1. It gets its own venv inside .venv, where vlp finds it; tests/test_img2dataset.py runs it.
I2D_VENV := $(VENV)/img2dataset
I2D_STAMP := $(I2D_VENV)/.installed

.PHONY: venv test demo bench clean img2dataset

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

$(I2D_STAMP):
	test -x $(I2D_VENV)/bin/python || $(PY) -m venv $(I2D_VENV)
	$(I2D_VENV)/bin/pip install -q img2dataset==1.47.0
	touch $(I2D_STAMP)

img2dataset: $(I2D_STAMP)

test: $(STAMP) $(I2D_STAMP)
	$(BIN)/python -m pytest -q --durations=25 tests

demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/vlp demo --model $(MODEL) $(if $(NPROC),--nproc $(NPROC))

bench: $(STAMP)
	$(BIN)/python benchmarks/loader.py

clean:
	rm -rf runs .pytest_cache
