# The two commands of the README:
#   make demo   install, then run the main job (the pocket sweep, locally, on CPU)
#   make test   install (with the test tools), then run the test suite
# TORCH_SPEC picks the PyTorch build: the default names the 2.13.0 release. On a machine
# without an NVIDIA driver (no nvidia-smi) it comes from PyTorch's CPU wheel index, which
# brings no CUDA libraries and no Triton (about 2.5 GB less); on GPU machines pip's default
# (CUDA) wheel, or the requirement PyTorch's install selector prints. TORCH_INDEX= (empty)
# keeps pip's own index. Progress is printed: the first install downloads for minutes.

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,--extra-index-url https://download.pytorch.org/whl/cpu)
PYTEST_ARGS ?=

.PHONY: install install-dev demo test bench

install:
	$(PYTHON) -m pip install $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[train]"

install-dev: install
	$(PYTHON) -m pip install -e ".[train,dev]"

demo: install
	$(PYTHON) -m moe demo

test: install install-dev
	$(PYTHON) -m pytest -q --durations=25 $(PYTEST_ARGS)

bench: install
	$(PYTHON) benchmarks/bench_train.py
	$(PYTHON) benchmarks/bench_cpu.py
	$(PYTHON) -m moe bench kernels
