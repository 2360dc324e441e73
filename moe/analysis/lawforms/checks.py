"""Identification checks of a registry law, each named, and the verdict that lists them.

Every fit records which checks ran and which did not (with why), so a verdict never depends
silently on a flag: ``checks = {"ran": [...], "not_run": {name: why}}``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

import moe.analysis.lawforms.base as base
from moe.analysis import identify

HESSIAN_NOT_RUN = ("not computed for the registry laws: parameter trade-offs show up as wide "
                   "bootstrap intervals, which are checked")


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
    exponent range, irreducible loss, parameters at bounds, and (``n_boot`` >= 2) bootstrap
    intervals; with ``n_boot`` < 2 the interval check is 'not checked' (``skip_why``)."""
    issues = _data_issues(result.law, x) + _fit_issues(result, loss)
    ran = ["spread of each variable", "exponent range", "parameters at bounds"]
    if "n" in result.law.variables and "d" in result.law.variables:
        ran.append("N-D collinearity")
    if result.law.floor:
        ran.append("irreducible loss below the data")
    not_run = {"Hessian condition": HESSIAN_NOT_RUN}
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
