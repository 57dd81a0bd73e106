# llama2rwkv — the commands that do everything on a fresh machine:
#   make demo    the whole stack on CPU with a tiny teacher (install included)
#   make up-cpu  the same services in Docker on CPU, built offline (deploy.mk; make down)
#   make test    the linter, then the whole test suite (install included)

SHELL := /bin/bash
PY := .venv/bin/python
VENV_STAMP := .venv/.installed
# CPU torch where there is no GPU (this file lies on the CI machines' disk; elsewhere point
# TORCH_SPEC/PIP_EXTRA at your torch build); a CUDA build where nvidia-smi finds a GPU.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH_SPEC ?= $(if $(HAS_GPU),torch,torch==2.13.0)
PIP_EXTRA ?=
PYTEST_ARGS ?=

.PHONY: install lint test test-gpu demo clean help

help:
	@echo "make demo | make test | make lint | make install | make up | make up-cpu | make down | make up-local | make check-deploy"

install: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIP_EXTRA) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet $(PIP_EXTRA) -c constraints.txt -e ".[dev]"
	touch $@

# ruff, configured in pyproject.toml ([tool.ruff]); installed by make install (dev extras).
lint: $(VENV_STAMP)
	.venv/bin/ruff check .

test: lint
	bash .ci/install_tools.sh $(PY)
	$(PY) -m pytest -q -ra --durations=25 $(PYTEST_ARGS) tests

# On a GPU machine: the CUDA/NCCL tests (skipped on CPU) and nothing else.
test-gpu: $(VENV_STAMP)
	$(PY) -m pytest -q -ra -m gpu tests

clean:
	rm -rf .venv runs .pytest_cache

include deploy.mk
include demo.mk
