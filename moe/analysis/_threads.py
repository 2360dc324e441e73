"""Keep OpenBLAS single-threaded while fitting (what threadpoolctl does, without the dependency).

The fits make many tiny BLAS calls (240 x 3 matrices). A multi-threaded OpenBLAS wakes its
threads for each and spins them: measured on this project's 2-core machine, that made a fit
use 2-5x its single-thread CPU time under load, and made 2 forked bootstrap workers slower
than one process. Linux only; elsewhere these are no-ops.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys

_SETTERS = ("openblas_set_num_threads", "openblas_set_num_threads64_",
            "scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads")
_GETTERS = ("openblas_get_num_threads", "openblas_get_num_threads64_",
            "scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads")


def _openblas_libs() -> list:
    """(getter, setter) pairs of every OpenBLAS loaded in this process."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "openblas" in line.lower()}
    except OSError:
        return []
    pairs = []
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        getter = next((getattr(lib, n) for n in _GETTERS if hasattr(lib, n)), None)
        setter = next((getattr(lib, n) for n in _SETTERS if hasattr(lib, n)), None)
        if getter is not None and setter is not None:
            pairs.append((getter, setter))
    return pairs


def set_single_thread() -> int:
    """Limit every loaded OpenBLAS to one thread for good; returns how many were limited."""
    libs = _openblas_libs()
    for _, setter in libs:
        setter(1)
    return len(libs)


@contextlib.contextmanager
def single_thread_blas():
    """Run the block with OpenBLAS limited to one thread, then restore the previous counts."""
    libs = _openblas_libs()
    before = [int(getter()) for getter, _ in libs]
    for _, setter in libs:
        setter(1)
    try:
        yield
    finally:
        for (_, setter), n in zip(libs, before, strict=True):
            setter(n)
