"""Shared test setup. Runs before any test module imports a kernel."""

import os

import pytest

# Triton kernels run on CPU only under the interpreter, which must be chosen
# before any @triton.jit function is defined (docs/architecture.md, "Facts measured on
# these machines").
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The sandbox (and CI) has no network: `datasets` and the Hub must answer from their
# caches at once instead of waiting for a connection that never comes (about 23 s per
# real-task split that is not in the local fixtures).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Two cores are shared by everything a CI run does; one thread per test process
# is both faster and reproducible.
if not _has_cuda:
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not _has_cuda:
            item.add_marker(skip_gpu)
