# Diffusion from the Papers
#
#   make lab [PROFILE=smoke|cpu|gpu] [LAB_ARGS=...]              read interactively: JupyterLab in chapters/
#   make book [PROFILE=smoke|cpu|gpu] [FORCE=1] [COLD=1] [ONLY="01 03"]   execute the chapters, render _build/
#   make test                                                    ruff, then pytest: tests/ and every
#                                                                chapter (nbval, smoke profile)
#   make setup [TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"]
#
# All of them first set up .venv (once; again only when pyproject.toml or requirements-nodeps.txt
# change). torch is installed only when none is importable, with `pip install $(TORCH)`: TORCH holds
# pip arguments (default torch==2.13.0). From PyPI that is the CPU wheel on macOS but the CUDA build
# on Linux (gigabytes); the TORCH above takes the CPU wheel from PyTorch's index. A bare
# `torch` would pull a CUDA build too. PROFILE defaults to $DIFFUSION_PROFILE, else gpu with CUDA,
# else cpu. `make book` and `make lab` share the model cache .cache/models ($DIFFUSION_CACHE moves it).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.diffusion-book-setup
TORCH ?= torch==2.13.0
PROFILE ?=
LAB_ARGS ?=
NOTEBOOKS := $(wildcard chapters/*.ipynb)
TEST_CACHE := $(CURDIR)/.cache/test-models

.PHONY: help setup lab book test readme clean

help:
	@sed -n '3,8p' Makefile | sed 's/^# \{0,1\}//'

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-nodeps.txt
	@test -x $(PY) || { echo "creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "torch $$($(PY) -c 'import torch; print(torch.__version__)') is installed: keeping it"; \
	else \
	  $(PY) -m pip install $(TORCH); \
	fi
	$(PY) -m pip install -e ".[book,test]"
	$(PY) -m pip install --no-deps -r requirements-nodeps.txt
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (diffusion book)"
	@touch $@

# JupyterLab on localhost in chapters/, with the kernel installed above ("python3", this .venv's Python)
# and the ipywidgets extension (jupyterlab_widgets, an ipywidgets dependency) for the sliders.
# JUPYTER_PREFER_ENV_PATH=1: this .venv's kernel wins over a "python3" kernel in ~/.local/share/jupyter.
# Not headless, so sliders wait for the reader. Ctrl-C stops it. LAB_ARGS go to JupyterLab, e.g.
# LAB_ARGS="--no-browser --port=8890" on a remote machine, or --allow-root in a container.
lab: $(STAMP)
	JUPYTER_PREFER_ENV_PATH=1 DIFFUSION_HEADLESS=0 DIFFUSION_CACHE="$${DIFFUSION_CACHE:-$(CURDIR)/.cache/models}" \
	  $(if $(PROFILE),DIFFUSION_PROFILE=$(PROFILE)) \
	  $(PY) -m jupyter lab --ServerApp.root_dir=chapters --ServerApp.ip=localhost \
	  --MultiKernelManager.default_kernel_name=python3 $(LAB_ARGS)

book: $(STAMP)
	$(PY) -m diffusion_core.book build $(if $(PROFILE),--profile $(PROFILE)) $(if $(FORCE),--force) $(if $(COLD),--cold) \
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
