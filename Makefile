# Diffusion from the Papers
#
#   make book [PROFILE=smoke|cpu|gpu] [FORCE=1] [ONLY="01 03"]   execute the chapters, render _build/
#   make test                                                    ruff, then pytest: tests/ and every
#                                                                chapter (nbval, smoke profile)
#
# Both first set up .venv (once; again only when pyproject.toml or requirements-nodeps.txt change).
# torch is installed as the local CPU wheel torch==2.13.0, and only when none is importable: a bare
# `torch` would pull a multi-GB CUDA build. PROFILE defaults to $DIFFUSION_PROFILE, else gpu with
# CUDA, else cpu.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.diffusion-book-setup
TORCH ?= torch==2.13.0
PROFILE ?=
NOTEBOOKS := $(wildcard chapters/*.ipynb)
TEST_CACHE := $(CURDIR)/.cache/test-models

.PHONY: help setup book test readme clean

help:
	@sed -n '3,6p' Makefile | sed 's/^# \{0,1\}//'

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-nodeps.txt
	@test -x $(PY) || { echo "creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "torch $$($(PY) -c 'import torch; print(torch.__version__)') is installed: keeping it"; \
	else \
	  $(PY) -m pip install "$(TORCH)"; \
	fi
	$(PY) -m pip install -e ".[book,test]"
	$(PY) -m pip install --no-deps -r requirements-nodeps.txt
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (diffusion book)"
	@touch $@

book: $(STAMP)
	$(PY) -m diffusion_core.book build $(if $(PROFILE),--profile $(PROFILE)) $(if $(FORCE),--force) \
	  $(if $(ONLY),--only $(ONLY))

# One pytest run: the package's tests and, through nbval (--nbval-lax: only cells marked
# `# NBVAL_CHECK_OUTPUT` compare outputs), every chapter notebook at the smoke profile. Notebooks are
# passed by name, so chapters/*.py are never collected and an empty chapters/ is fine.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	DIFFUSION_PROFILE=smoke DIFFUSION_HEADLESS=1 DIFFUSION_CACHE=$(TEST_CACHE) \
	  $(PY) -m pytest tests $(NOTEBOOKS) --nbval-lax --nbval-current-env -p no:cacheprovider

readme: $(STAMP)
	$(PY) -m diffusion_core.book readme

clean:
	rm -rf _build
