# The two commands of the README:
#   make demo   install, then run the main job (the pocket sweep, locally, on CPU)
#   make test   install, then run the test suite
# TORCH_SPEC picks the PyTorch build: the default names the 2.13.0 release (a CPU
# wheel on machines that provide one locally; use a CUDA build on GPU machines).

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test bench

install:
	$(PYTHON) -m pip install --quiet "$(TORCH_SPEC)"
	$(PYTHON) -m pip install --quiet -e ".[dev]"

demo: install
	$(PYTHON) -m moe demo

test: install
	$(PYTHON) -m pytest -q --durations=25 $(PYTEST_ARGS)

bench: install
	$(PYTHON) benchmarks/bench_train.py
	$(PYTHON) -m moe bench kernels
