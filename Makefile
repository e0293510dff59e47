# Fresh machine: `make pipeline` (set up, then dvc repro) or `make test` (set up, then pytest).
VENV ?= .venv
PYTHON ?= python3
# Where pip finds torch. Empty: the default index (PyPI serves CUDA builds for Linux, right for a
# GPU box). On a CPU-only machine elsewhere: TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
BIN := $(abspath $(VENV))/bin
# The machine's own PATH, before the venv goes first: the GPU smoke run uses its Python.
MACHINE_PATH := $(PATH)
# DVC runs each stage's cmd (`python -m stages.x`) with this PATH: the venv's python first.
export PATH := $(BIN):$(PATH)

.PHONY: setup pipeline test test-fast lint bench serve compare push pull gpu-smoke smoke-wheels \
	gpu-rehearsal gpu-check gguf-parity

setup: $(VENV)/.installed

# uv installs into the venv: the same packages as pip, in about a minute instead of 3.5 on
# a 2-core machine (README, "Quick start"). It reads pip's find-links from PIP_FIND_LINKS, where
# a machine keeps local wheels (torch's, here). Bytecode is compiled at install, as pip does:
# without it every stage's process compiles torch's and transformers' modules again (importing
# TRL's GRPOTrainer: 12.4 s instead of 7).
UV = $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))

# torch first and pinned: a bare `torch` requirement, resolved later for the project's
# dependencies, would pull the newest torch with several GB of CUDA wheels.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "uv>=0.13,<0.14"
	$(BIN)/python -c "import torch" 2>/dev/null || $(UV) torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(UV) -e ".[dev]"
	# torchao (the GPU int8 path): in the venv on a machine whose torch sees a GPU, so that
	# quantize and evaluate measure int8 there; elsewhere beside the venv, off its path
	# (installed, transformers imports it in every process and it prints warnings;
	# tests/test_quantize.py loads it on purpose).
	if $(BIN)/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		$(UV) "torchao>=0.18,<0.19"; \
	else \
		$(UV) --no-deps --target $(VENV)/torchao "torchao>=0.18,<0.19"; \
	fi
	touch $@

pipeline: setup
	dvc repro

test: setup
	pytest

# The inner loop: every test but the end-to-end ones (marked slow: DVC pipelines, several
# processes, the GPU check's dry run, the kit): under 3 minutes here, against 14 for `make test`.
test-fast: setup
	pytest -m "not slow"

# ruff's lint rules and its formatter (CI fails on either; `ruff format` fixes the second).
lint: setup
	ruff check src stages tests bench scripts
	ruff format --check src stages tests bench scripts

bench: setup
	python bench/tokenize_throughput.py
	python bench/train_step.py

# Every model the pipeline made over the OpenAI API, and the page that compares them
# (docs/serving.md): http://127.0.0.1:8000/. E.g. SERVE_ARGS="--port 8001".
SERVE_ARGS ?=
serve: setup
	python -m llmpipe.serve $(SERVE_ARGS)

# llama.cpp itself on the gguf stage's files (docs/serving.md): llama-cpp-python built once from
# its sdist (it vendors llama.cpp: minutes of compiling on two cores, so not in CI), then
# scripts/gguf_parity.py: tokens, greedy continuations and log-probabilities against the HF models.
LLAMA_CPP_PYTHON ?= llama-cpp-python==0.3.36
gguf-parity: setup
	python -c "import llama_cpp" 2>/dev/null || \
		$(BIN)/uv pip install --python $(BIN)/python "$(LLAMA_CPP_PYTHON)"
	python scripts/gguf_parity.py

# The DVC remote (.dvc/config: a folder beside the repository unless switched;
# docs/sharing-and-experiments.md) with the run-cache and the outputs its runs name, so that
# another clone restores, with `dvc repro --pull`, any stage run it has not computed itself.
push: setup
	python -m llmpipe.share
pull: setup
	dvc pull --run-cache

# The markdown a pull request gets as a comment: params and metrics diff against REV.
REV ?= main
compare: setup
	python -m llmpipe.compare $(REV)

# The GPU smoke run (docs/presets-and-gpu.md): the whole chain on one GPU without DVC, on the
# machine's own Python stack (no venv: an air-gapped GPU box brings its own torch). Missing
# dependencies are installed from $(WHEELS) when that folder exists.
WHEELS ?= wheels
SMOKE_PYTHON ?= python3
SMOKE_ARGS ?=
gpu-smoke:
	PATH="$(MACHINE_PATH)" PYTHONPATH=src$(if $(PYTHONPATH),:$(PYTHONPATH)) \
		$(SMOKE_PYTHON) -m llmpipe.smoke gpu-smoke \
		$(if $(wildcard $(WHEELS)),--wheels $(WHEELS)) $(SMOKE_ARGS)

# On a connected machine: the smoke kit, exactly what the GPU image lacks or has too old
# (requirements/gpu-kit.txt), as wheels for its Python and platform, --no-deps, from a clean
# pip cache, at most 48 MiB (scripts/gpu_kit.py checks). SMOKE_KIT_ARGS=--local: for this
# machine's Python instead (the rehearsal).
SMOKE_KIT_ARGS ?=
smoke-wheels:
	$(PYTHON) scripts/gpu_kit.py build --dest $(WHEELS) $(SMOKE_KIT_ARGS)

# What a lent GPU machine runs (scripts/gpu_check.py): results in $$OUT or runs/gpu_check.
gpu-check:
	PATH="$(MACHINE_PATH)" bash scripts/gpu_check.sh $(if $(wildcard $(WHEELS)),--wheels $(WHEELS))

# The GPU check rehearsed here: a virtualenv with the GPU image's packages where the registries
# have them (requirements/gpu-image.txt; the pinned CPU torch stands in for its torch 2.11), the
# kit built for this Python and installed into it offline exactly as the GPU check installs it,
# then scripts/gpu_check.sh --dry-run there. What would fail on the image fails here first.
REHEARSAL ?= .gpu-rehearsal
gpu-rehearsal: setup
	rm -rf $(REHEARSAL) && $(PYTHON) -m venv $(REHEARSAL)/venv
	$(BIN)/uv pip install --quiet --python $(REHEARSAL)/venv/bin/python \
		$(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) \
		$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	$(BIN)/uv pip install --quiet --python $(REHEARSAL)/venv/bin/python \
		-r requirements/gpu-image.txt
	$(REHEARSAL)/venv/bin/python -m ensurepip --upgrade >/dev/null
	$(PYTHON) scripts/gpu_kit.py build --local --dest $(REHEARSAL)/wheels
	PYTHON=$(abspath $(REHEARSAL))/venv/bin/python bash scripts/gpu_check.sh --dry-run \
		--wheels $(REHEARSAL)/wheels --out $(REHEARSAL)/out --work $(REHEARSAL)/work
