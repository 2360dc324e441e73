"""The application layer: the `moe` command line, the demo and the benchmarks.

The only layer that sees all others (`docs/architecture.md`); nothing below imports it.
"""
