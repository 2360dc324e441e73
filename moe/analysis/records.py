"""What `moe fit` writes and `moe report` states: one policy for both, in the analysis layer.

Policy (the only place it is defined):
- checks that need resamples always run: without an explicit number of resamples a fit is
  bootstrapped with :data:`CHECK_RESAMPLES` (cheap: about a second), and a user who asks for
  0 resamples gets a verdict whose bootstrap check says "not checked";
- Approach 2 always measures its own bias on the table's grid (:func:`approach2`), with the
  Approach-3 law of the same rows whatever its verdict, or Besiroglu et al.'s reference law
  when no Approach-3 fit can be made.
"""

from __future__ import annotations

import numpy as np

from moe.analysis import fit as fitmod
from moe.analysis import isoflop

CHECK_RESAMPLES = 100
# Besiroglu et al. 2024 (arXiv 2404.10102), their refit of Chinchilla's Approach 3
REFERENCE_LAW = {"E": 1.8172, "A": 477.8, "B": 2143.9, "alpha": 0.3473, "beta": 0.3672}


def resamples(requested: int | None) -> int:
    """Bootstrap resamples to run: the user's number, else :data:`CHECK_RESAMPLES`."""
    return CHECK_RESAMPLES if requested is None else int(requested)


def bias_law(n, loss, flops, tokens=None) -> tuple[dict, str]:
    """(Chinchilla parameters, where they came from) for measuring Approach 2's bias."""
    n, loss, flops = (np.asarray(v, dtype=float) for v in (n, loss, flops))
    d = flops / (6.0 * n) if tokens is None else np.asarray(tokens, dtype=float)
    try:
        law = fitmod.fit_data(fitmod.FitData(n=n, d=d, loss=loss))
    except ValueError as exc:
        return REFERENCE_LAW, (f"Besiroglu et al. 2024's Chinchilla refit (no Approach-3 fit "
                               f"of this table: {exc})")
    state = "identified" if law.verdict.identified else "not identified"
    return law.params, f"the Approach-3 law of the same rows ({state})"


def approach2(n, loss, flops, *, tokens=None, window=None, n_boot: int | None = None,
              seed: int = 0) -> isoflop.IsoFlopFit:
    """Approach 2 with the policy above: intervals from :func:`resamples` and the method's
    bias on this grid always measured (a bias over 5% blocks the verdict)."""
    params, source = bias_law(n, loss, flops, tokens)
    return isoflop.fit_isoflop(n, loss, flops, tokens=tokens, window=window,
                               n_boot=resamples(n_boot), seed=seed, bias_params=params,
                               bias_source=source)
