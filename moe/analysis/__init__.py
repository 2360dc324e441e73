"""Scaling-law analysis of MoE sparsity sweeps: laws, fitters, sparsity optima, figures, reports.

Reads results tables only (csv or parquet); never imports ``moe``, ``sweeps`` or ``kernels``.
Importing this package does no work: submodules are imported where they are used.
"""

from moe.analysis.tables import TableError

__all__ = ["TableError"]
