"""Is a fitted quantity identified by the data? Checks shared by every fitter.

Each check returns :class:`Issue` items; a *blocking* issue makes the quantity not
identified, a non-blocking one is only a warning. :class:`Verdict` carries the result into
every JSON record and report: ``identified`` (bool) and ``warnings`` (list of str).

The checks (from the data and from the fit):
- a fitted variable with fewer than 3 distinct values, or spanning less than a decade;
- parameters at their bounds (an exponent at 0 or at the optimiser's cap, a coefficient at 0);
- an ill-conditioned Hessian of the objective at the optimum;
- bootstrap intervals wider than the estimate (or, for the coefficients A and B, wider
  than a factor of 10);
- exponents outside (0.05, 2);
- E below zero or above the lowest observed loss;
- an optimum outside the sampled range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

EXPONENT_RANGE = (0.05, 2.0)
MIN_DISTINCT = 3
MIN_DECADES = 1.0
MAX_CONDITION = 1e5  # of the diagonally scaled Hessian; well-posed fits here are ~1e3
NEGLIGIBLE = 1e-6  # a term this small relative to the lowest loss is at its bound 0
# The one bootstrap policy of `moe fit` and `moe report`: checks that need resamples always
# run, with this many resamples unless the user names a number; 0 makes them "not checked".
CHECK_RESAMPLES = 100


def resamples(requested: int | None) -> int:
    """Bootstrap resamples to run: the user's number, else :data:`CHECK_RESAMPLES`."""
    return CHECK_RESAMPLES if requested is None else int(requested)


@dataclass(frozen=True, kw_only=True)
class Issue:
    message: str
    blocking: bool = True


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """Whether a quantity is identified, and every warning about it."""

    identified: bool
    warnings: tuple = field(default_factory=tuple)
    reasons: tuple = field(default_factory=tuple)  # the blocking warnings

    def __post_init__(self):
        if self.identified and self.reasons:
            raise ValueError("a Verdict with blocking reasons cannot be identified")

    @classmethod
    def of(cls, issues) -> Verdict:
        issues = list(issues)
        reasons = tuple(i.message for i in issues if i.blocking)
        return cls(identified=not reasons, warnings=tuple(i.message for i in issues),
                   reasons=reasons)

    @property
    def reason(self) -> str:
        """One line: why it is not identified ('' when it is)."""
        return "; ".join(self.reasons)

    def to_dict(self) -> dict:
        return {"identified": self.identified, "warnings": list(self.warnings),
                "reasons": list(self.reasons)}


def spread(values, name: str) -> list[Issue]:
    """Fewer than 3 distinct values, or less than a decade of range, of a fitted variable."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    distinct = len(np.unique(np.round(np.log(v[v > 0]), 9))) if len(v) else 0
    if distinct < MIN_DISTINCT:
        return [Issue(message=f"{name} takes {distinct} distinct value(s); need at least "
                              f"{MIN_DISTINCT}")]
    ratio = float(v.max() / v.min())
    if np.log10(ratio) < MIN_DECADES:
        return [Issue(message=f"{name} spans only a factor of {ratio:.3g} (less than a decade)")]
    return []


def exponent(value: float, name: str) -> list[Issue]:
    lo, hi = EXPONENT_RANGE
    if not np.isfinite(value):
        return [Issue(message=f"{name} is not finite")]
    if not lo < value < hi:
        return [Issue(message=f"{name} = {value:.3g} is outside ({lo:g}, {hi:g})")]
    return []


def interval(name: str, estimate: float, bounds, *, log_scale: bool = False) -> list[Issue]:
    """A bootstrap interval wider than the estimate (log_scale: wider than a factor of 10)."""
    lo, hi = (float(b) for b in bounds)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return [Issue(message=f"the bootstrap interval of {name} is not finite")]
    if log_scale:
        if lo <= 0 or hi / lo > 10.0:
            return [Issue(message=f"the bootstrap interval of {name} [{lo:.3g}, {hi:.3g}] spans "
                                  "more than a factor of 10")]
        return []
    if hi - lo > abs(estimate):
        return [Issue(message=f"the bootstrap interval of {name} [{lo:.3g}, {hi:.3g}] is wider "
                              "than its estimate")]
    return []


def hessian_condition(objective_grad, theta, eps: float = 1e-5) -> float:
    """Condition number of the diagonally scaled Hessian (central differences of the gradient);
    inf when it is singular or not positive definite."""
    theta = np.asarray(theta, dtype=float)
    p = len(theta)
    h = np.empty((p, p))
    for i in range(p):
        step = np.zeros(p)
        step[i] = eps
        h[:, i] = (objective_grad(theta + step) - objective_grad(theta - step)) / (2 * eps)
    h = (h + h.T) / 2.0
    d = np.sqrt(np.abs(np.diag(h)))
    if np.any(d <= 0) or not np.all(np.isfinite(h)):
        return float("inf")
    eig = np.linalg.eigvalsh(h / np.outer(d, d))
    return float("inf") if eig.min() <= 0 else float(eig.max() / eig.min())


def condition(cond: float) -> list[Issue]:
    if cond > MAX_CONDITION:
        shown = "singular or not positive definite" if not np.isfinite(cond) else f"{cond:.3g}"
        return [Issue(message=f"ill-conditioned Hessian at the optimum ({shown}): parameters "
                              "trade off against each other")]
    return []


def optimum_inside(value: float, lo: float, hi: float, name: str) -> list[Issue]:
    if not np.isfinite(value):
        return [Issue(message=f"{name}: none (the fitted curve has no minimum)")]
    if not lo <= value <= hi:
        return [Issue(message=f"{name} = {value:.3g} lies outside the sampled range "
                              f"[{lo:.3g}, {hi:.3g}]")]
    return []
