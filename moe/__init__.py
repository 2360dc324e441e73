"""MoE decoder language models and the single training/evaluation job of a sweep.

Importing this package does no work; see `moe.config`, `moe.model`, `moe.train`.
"""

__version__ = "0.1.0"
