"""What `moe fit` writes (fit.json) and what `moe report` states: one policy for both, in
the analysis layer; the command line only parses flags and prints.

Policy (defined here and in :func:`moe.analysis.identify.resamples`):
- checks that need resamples always run: without an explicit number of resamples a fit is
  bootstrapped with :data:`moe.analysis.identify.CHECK_RESAMPLES`, and a user who asks for
  0 resamples gets a verdict whose bootstrap check says "not checked"; every record lists
  the checks that ran and those that did not, with why;
- Approach 2 always measures its own bias on the table's grid (:func:`approach2`), with the
  Approach-3 law of the same rows whatever its verdict, or Besiroglu et al.'s reference law
  when no Approach-3 fit can be made.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moe.analysis import fit as fitmod
from moe.analysis import identify, isoflop, lawfit, lawforms
from moe.analysis.columns import Columns
from moe.analysis.tables import TableError, used_columns

# Besiroglu et al. 2024 (arXiv 2404.10102), their refit of Chinchilla's Approach 3
REFERENCE_LAW = {"E": 1.8172, "A": 477.8, "B": 2143.9, "alpha": 0.3473, "beta": 0.3672}
BOOT_NOT_RUN = "not checked: --bootstrap 0"


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
    """Approach 2 under the policy: intervals from :func:`identify.resamples` and the method's
    bias on this grid always measured (a bias over 5% blocks the verdict)."""
    params, source = bias_law(n, loss, flops, tokens)
    return isoflop.fit_isoflop(n, loss, flops, tokens=tokens, window=window,
                               n_boot=identify.resamples(n_boot), seed=seed,
                               bias_params=params, bias_source=source)


def approach3(data: fitmod.FitData, *, n_boot: int | None = None, seed: int = 0):
    """(fit with its final verdict and checks, bootstrap or None) under the policy."""
    from moe.analysis.bootstrap import bootstrap_fit

    fit = fitmod.fit_data(data)
    k = identify.resamples(n_boot)
    if k < 2:
        return fitmod.with_checks(fit, skipped={"bootstrap intervals": BOOT_NOT_RUN}), None
    boot = bootstrap_fit(fit, data, n_resamples=k, seed=seed)
    return fitmod.with_bootstrap(fit, data, boot), boot


def approach2_record(df: pd.DataFrame, cols: Columns, *, c_col: str, window=None,
                     n_boot: int | None = None, seed: int = 0) -> tuple[dict, str, int]:
    """(fit.json record, one-line summary, rows dropped for NaN) of Approach 2."""
    has_tokens = cols.d in df
    if not has_tokens and "d" in cols.explicit:
        raise TableError(f"column {cols.d!r} named by --d-col is not in the table")
    cols.require(df, ["n", "loss", "c"], purpose="Approach 2", columns={"c": c_col})
    use = [cols.n, cols.loss, c_col] + ([cols.d] if has_tokens else [])
    values, keep = used_columns(df, use, purpose="Approach 2")
    res = approach2(values[:, 0], values[:, 1], values[:, 2],
                    tokens=values[:, 3] if has_tokens else None, window=window, n_boot=n_boot,
                    seed=seed)
    n_kind = _n_kind(cols.n)
    record = {**res.to_dict(), "columns": {"n": cols.n, "loss": cols.loss, "c": c_col,
                                           **({"d": cols.d} if has_tokens else {})},
              "n_kind": n_kind,
              "checks": {"ran": ["interior budgets", "compute span", "exponent range",
                                 "the method's bias on this grid"]
                         + ([f"bootstrap intervals ({res.n_boot} resamples)"]
                            if res.n_boot else []),
                         "not_run": {} if res.n_boot else {"bootstrap intervals": BOOT_NOT_RUN}},
              "compute": (f"C from {c_col!r}; D_opt = C / FLOPs-per-token(N_opt), FLOPs per "
                          f"token interpolated from {c_col!r} / {cols.d!r} at each budget"
                          if has_tokens else f"C from {c_col!r}; D_opt = C / (6 N_opt): the "
                          "table has no tokens column, so N is assumed to do all the compute")}
    if not has_tokens:
        record["warnings"].append(f"no tokens column {cols.d!r}: D_opt = C / (6 N_opt) assumes "
                                  "the fitted N does all the compute (wrong for MoE total N)")
    bias = res.bias.get("relative")
    summary = (f"approach 2 (window {res.window.label}): a={_fmt(res.a)}, b={_fmt(res.b)}, "
               f"N_opt = {_fmt(res.n_prefactor)} C^a, D_opt = {_fmt(res.d_prefactor)} C^b "
               f"from {len(res.interior)} of {len(res.budgets)} budget(s) (N = {n_kind}); the "
               f"method's bias on this grid: "
               + ("n/a" if bias is None else f"{100 * bias:+.1f}% in a"))
    return record, summary, int((~keep).sum())


def _n_kind(col: str) -> str:
    return next((k for k in ("active", "total") if k in col.lower()),
                f"as given in column {col!r}")


def _fmt(x) -> str:
    return "n/a" if x is None or x != x else f"{x:.4g}"


def approach3_record(df: pd.DataFrame, test: pd.DataFrame | None, cols: Columns, *,
                     law: str = "chinchilla", c_col: str | None = None, drop_highest: int = 0,
                     n_boot: int | None = None, seed: int = 0) -> tuple[dict, str, list]:
    """(fit.json record, summary, [(rows dropped, which)]) of the chinchilla/fixed_data fit;
    ``c_col`` derives D = C / (6 N) from compute instead of the tokens column."""
    roles = ["n", "loss"] + ([] if law == "fixed_data" else ["c" if c_col else "d"])
    cols.require(df, roles, purpose=f"the {law} fit", columns={"c": c_col})
    kwargs = {"law": law, "n_col": cols.n, "d_col": cols.d, "loss_col": cols.loss,
              "c_col": c_col, "flops_col": None if c_col else cols.c,
              "drop_highest": drop_highest}
    if "c" not in cols.explicit and cols.c not in df:
        kwargs["flops_col"] = None
    data = fitmod.prepare(df, **kwargs)
    result, boot = approach3(data, n_boot=n_boot, seed=seed)
    record = {**result.to_dict(), "intervals": {}}
    if boot is not None:
        summary = boot.to_dict(with_samples=True)
        record.update(intervals=summary.pop("intervals"), bootstrap=summary)
    record["ranges"] = {"n": [float(data.n.min()), float(data.n.max())],
                        **({"d": [float(data.d.min()), float(data.d.max())]}
                           if data.d is not None else {})}
    dropped = [(data.n_nan_dropped, "")]
    text = (f"{kwargs['law']}: " + ", ".join(f"{k}={v:.4g}" for k, v in result.params.items())
            + f"; objective={result.objective:.6g}; n={result.n_points} "
            f"(N = {result.n_kind}); {result.seconds:.2f}s")
    if test is not None:
        held = fitmod.prepare(test, **{**kwargs, "drop_highest": 0, "min_points": 1})
        dropped.append((held.n_nan_dropped, "held-out "))
        record["test"] = fitmod.held_out(result, held)
        text += (f"; held-out mean |rel. error| {100 * record['test']['mean_abs_rel_error']:.2f}%"
                 f" on {record['test']['n_points']} row(s)")
    return record, text, dropped


def law_record(df: pd.DataFrame, test: pd.DataFrame | None, name: str, cols: Columns, *,
               c_col: str | None = None, n_boot: int | None = None,
               seed: int = 0) -> tuple[dict, str]:
    """(fit.json record, summary) of a registry law (:mod:`moe.analysis.lawforms`)."""
    law = lawforms.get(name)
    x, loss, columns = lawfit.inputs(df, law, cols, c_col=c_col)
    result = lawfit.fit_checked(law, x, loss, n_boot=n_boot, seed=seed)
    record = lawfit.record(result, columns)
    text = (f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in result.params.items())
            + f"; objective={result.objective:.6g}; n={result.n_points}; "
            f"{result.seconds:.2f}s")
    if test is not None:
        xt, loss_t, _ = lawfit.inputs(test, law, cols, c_col=c_col, min_points=1)
        err, iv = lawfit.held_out_error(result, xt, loss_t)
        record["test"] = {"n_points": len(loss_t), "mean_abs_rel_error": err,
                          "interval": None if iv is None else list(iv)}
        text += f"; held-out mean |rel. error| {100 * err:.2f}% on {len(loss_t)} row(s)"
    return record, text


def compare_record(df: pd.DataFrame, test_index, names, cols: Columns, *,
                   c_col: str | None = None, n_boot: int | None = None,
                   seed: int = 0) -> tuple[dict, str]:
    """(record, summary table) of `moe fit --compare`; ``test_index`` None holds out the rows
    within a factor of 2 of the largest compute (the fit rows alone choose the law)."""
    if test_index is None:
        compute = _compute(df, cols, c_col)
        test_index = lawfit.largest_compute(df, compute)
    train, test = df.drop(index=test_index), df.loc[test_index]
    if len(train) < 5:
        raise TableError(f"the held-out split leaves {len(train)} rows to fit on; need 5")
    out = lawfit.compare(names, train, test, cols, c_col=c_col, n_boot=n_boot, seed=seed)
    lines = ["law | held-out mean |rel. error| (95% interval) | identified"]
    for r in out["laws"]:
        iv = r["interval"]
        shown = f"{100 * r['held_out_mean_abs_rel_error']:.3f}%" + (
            f" [{100 * iv[0]:.3f}, {100 * iv[1]:.3f}]" if iv else "")
        lines.append(f"{r['law']} | {shown} | "
                     + ("yes" if r["identified"] else f"no: {r['reason']}"))
    ties = f" (tied with {', '.join(out['tied_with'])})" if out["tied_with"] else ""
    lines.append(f"chosen: {out['chosen']}{ties} ({out['rule']}; {len(test)} held-out row(s))")
    return {"compare": out, "n_train": len(train), "n_test": len(test),
            "test_rows": [str(i) for i in test.index]}, "\n".join(lines)


def _compute(df: pd.DataFrame, cols: Columns, c_col: str | None) -> np.ndarray:
    """Training compute per row: the compute column, else 6 N D (floats: no int overflow)."""
    col = c_col or cols.c
    if col in df.columns:
        return pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)
    for role, flag in (("n", "--n-col"), ("d", "--d-col")):
        if getattr(cols, role) not in df.columns:
            raise TableError(f"the default held-out split needs compute: no column {col!r} "
                             f"(--c-col) and no {getattr(cols, role)!r} ({flag}); or pass "
                             "--test-where")
    n = pd.to_numeric(df[cols.n], errors="coerce").to_numpy(dtype=float)
    return 6.0 * n * pd.to_numeric(df[cols.d], errors="coerce").to_numpy(dtype=float)
