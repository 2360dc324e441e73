"""Identification checks of a registry law, each named, and the verdict that lists them.

Every fit records which checks ran and which did not (with why), so a verdict never depends
silently on a flag: ``checks = {"ran": [...], "not_run": {name: why}}``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

import moe.analysis.lawforms.base as base
import moe.analysis.lawforms.batch as batch
from moe.analysis import identify

# Of the Jacobian of log L_hat w.r.t. the refinement vector, columns scaled to unit norm (the
# Gauss-Newton Hessian's condition is its square). Measured: 30-760 on each law's synthetic
# table with 0.2% noise (tests/test_analysis_lawforms.py), 50-3e3 for chinchilla,
# chinchilla-tied and kaplan on the pocket-science and demo tables (1.5e16 for chinchilla on
# the demo table, fitted with E = 2e-31 and A N^-0.008 a second constant), 4e16-1e17 when E,
# G or S takes one value; a condition this large means some combination of parameters leaves
# every prediction unchanged to ~1e-6.
MAX_JACOBIAN_CONDITION = 1e6


def _data_issues(law: base.LawForm, x: dict) -> list:
    issues = []
    for role in law.variables:
        v = np.asarray(x[role], dtype=float)
        if role in ("e", "g", "s"):
            if len(np.unique(v)) < 2:
                issues.append(identify.Issue(message=f"{role.upper()} takes one value: the "
                                             "law's terms in it cannot be fitted"))
            continue
        issues += identify.spread(v, {"n": "N", "d": "D"}[role])
    if "n" in law.variables and "d" in law.variables:
        from moe.analysis.fit import FitData, _collinear
        issues += _collinear(FitData(n=np.asarray(x["n"], float), d=np.asarray(x["d"], float),
                                     loss=np.ones(len(x["n"]))))
    return issues


def _fit_issues(result: base.FormFit, loss: np.ndarray) -> list:
    law, p = result.law, result.params
    issues = []
    for name in law.exponents:
        issues += identify.exponent(abs(p[name]), f"|{name}|" if p[name] < 0 else name)
    if law.floor is not None:
        low = float(np.min(loss))
        if p[law.floor] >= low:
            issues.append(identify.Issue(message=f"{law.floor} = {p[law.floor]:.4g} is above "
                                         f"the lowest observed loss {low:.4g}"))
    for name in law.params:
        lo, hi = law.bounds[name]
        value = p[name]
        scale = max(abs(lo), abs(hi), 1e-12) if name not in law.log_params else abs(value)
        for bound in (lo, hi):
            close = (abs(np.log(max(value, 1e-300)) - np.log(max(bound, 1e-300))) < 1e-3
                     if name in law.log_params else abs(value - bound) < 1e-6 * scale)
            if close and not (name in law.exponents and bound == 0.0 and value > 0):
                issues.append(identify.Issue(message=f"{name} = {value:.3g} is at its bound "
                                             f"{bound:g}"))
    return issues


def jacobian_condition(result: base.FormFit, x: dict, loss: np.ndarray) -> tuple[float, list]:
    """(condition number of the column-scaled Jacobian of the log predictions at the fitted
    parameters, the parameters that dominate its weakest direction); inf when a column is 0
    or the matrix is singular."""
    law = result.law
    z = base._to_vector(law, result.params)
    jac = batch.law_model(law, x, np.log(loss))[1](z[None])[0]
    norms = np.linalg.norm(jac, axis=0)
    if not np.all(norms > 0):
        return float("inf"), [k for k, v in zip(law.params, norms, strict=True) if not v > 0]
    _, sv, vt = np.linalg.svd(jac / norms, full_matrices=False)
    weak = [law.params[j] for j in np.argsort(-np.abs(vt[-1])) if abs(vt[-1][j]) > 0.3]
    return (float(sv[0] / sv[-1]) if sv[-1] > 0 else float("inf")), weak


def _jacobian_issues(result: base.FormFit, x: dict, loss: np.ndarray) -> list:
    cond, weak = jacobian_condition(result, x, loss)
    if cond <= MAX_JACOBIAN_CONDITION:
        return []
    shown = "singular" if not np.isfinite(cond) else f"condition {cond:.3g}"
    return [identify.Issue(message=f"the data do not separate {', '.join(weak)}: the Jacobian "
                           f"of the predictions is ill-conditioned ({shown}), so these "
                           "parameters trade off against each other")]


def _boot_issues(result: base.FormFit, intervals: dict, failed: int, n_boot: int) -> list:
    issues = []
    for name, iv in intervals.items():
        issues += identify.interval(name, result.params[name], iv,
                                    log_scale=name in result.law.log_params)
    if failed > 0.1 * n_boot:
        issues.append(identify.Issue(message=f"{failed} of {n_boot} bootstrap resamples failed"))
    return issues


def checked(result: base.FormFit, x: dict, loss: np.ndarray, *, n_boot: int, seed: int = 0,
            skip_why: str = "") -> base.FormFit:
    """The fit with its verdict and the list of checks: data spread and collinearity,
    exponent range, irreducible loss, parameters at bounds, the Jacobian condition, and
    (``n_boot`` >= 2) bootstrap intervals; with ``n_boot`` < 2 the interval check is 'not
    checked' (``skip_why``)."""
    issues = _data_issues(result.law, x) + _fit_issues(result, loss)
    ran = ["spread of each variable", "exponent range", "parameters at bounds"]
    if "n" in result.law.variables and "d" in result.law.variables:
        ran.append("N-D collinearity")
    if result.law.floor:
        ran.append("irreducible loss below the data")
    not_run = {}
    if result.law.jacobian is not None:
        issues += _jacobian_issues(result, x, loss)
        ran.append("Jacobian condition")
    else:
        not_run["Jacobian condition"] = "the law has no analytic Jacobian"
    samples, intervals = {}, {}
    if n_boot >= 2:
        samples, intervals, failed = base.bootstrap(result, x, loss, n_resamples=n_boot,
                                                    seed=seed)
        issues += _boot_issues(result, intervals, failed, n_boot)
        ran.append(f"bootstrap intervals ({n_boot} resamples)")
    else:
        not_run["bootstrap intervals"] = f"not checked: {skip_why or 'no resamples'}"
    return replace(result, verdict=identify.Verdict.of(issues), samples=samples,
                   intervals=intervals, checks={"ran": ran, "not_run": not_run})
