# Fresh machine: `make pipeline` (set up, then dvc repro) or `make test` (set up, then pytest).
VENV ?= .venv
PYTHON ?= python3
# Where pip finds torch. Empty: the default index (PyPI serves CUDA builds for Linux, right for a
# GPU box). On a CPU-only machine elsewhere: TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
BIN := $(abspath $(VENV))/bin
# DVC runs each stage's cmd (`python -m stages.x`) with this PATH: the venv's python first.
export PATH := $(BIN):$(PATH)

.PHONY: setup pipeline test lint bench compare

setup: $(VENV)/.installed

# torch first and pinned: a bare `torch` requirement, resolved later by pip for the project's
# dependencies, would pull the newest torch with several GB of CUDA wheels.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

pipeline: setup
	dvc repro

test: setup
	pytest

lint: setup
	ruff check src stages tests bench

bench: setup
	python bench/tokenize_throughput.py
	python bench/train_step.py

# The markdown a pull request gets as a comment: params and metrics diff against REV.
REV ?= main
compare: setup
	python -m llmpipe.compare $(REV)
