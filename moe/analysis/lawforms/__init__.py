"""The law registry of `moe fit --law NAME`: one small module per published law form.

Each module defines ``LAW`` (a :class:`~moe.analysis.lawforms.base.LawForm`): formula and
citation, the table roles it needs, parameter bounds, a fast solver, ``predict`` and the
optimal allocation the paper defines. docs/laws.md has one section per law.
"""

from __future__ import annotations

from moe.analysis.lawforms import (
    abnar,
    chinchilla,
    chinchilla_tied,
    clark,
    gadre,
    kaplan,
    krajewski,
    ludziejewski,
)
from moe.analysis.lawforms.base import LawForm
from moe.errors import BadInput

REGISTRY: dict[str, LawForm] = {m.LAW.name: m.LAW for m in (
    chinchilla, chinchilla_tied, kaplan, gadre, clark, krajewski, ludziejewski, abnar)}


def get(name: str) -> LawForm:
    """The law called ``name``; an unknown name lists the registry."""
    if name in REGISTRY:
        return REGISTRY[name]
    raise BadInput(f"unknown law {name!r}; choose one of {', '.join(REGISTRY)}")
