"""Scaling-law analysis of MoE sparsity sweeps: laws, fitters, sparsity optima, figures, reports.

Reads results tables only (csv or parquet); of the rest of ``moe`` it imports only the base
modules ``moe.io`` and ``moe.config.tomlio`` (never torch). Every fitted object carries
``identified`` and ``warnings`` (:mod:`moe.analysis.identify`).
Importing this package does no work: submodules are imported where they are used.
"""

from moe.analysis.tables import TableError

__all__ = ["TableError"]
