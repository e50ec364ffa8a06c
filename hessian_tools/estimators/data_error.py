"""Data error bars: the delete-one-group jackknife interval, and the estimate against the amount of data.

What is estimated. The measurement batches are independent draws from a data distribution; the operator on
a set of batches is the Hessian of the mean loss over them (`make_op(batches)`), and `estimator(op)` measures
a quantity f of it (lambda_max, a trace, ...). The *population quantity* is theta = f(E[H]), f of the Hessian
of the expected loss: the limit of the estimate as the number of batches grows. The estimate on the union of
N batches, theta_hat = f(H_union), is consistent but biased at finite N (lambda_max is convex in H, so
E[theta_hat] >= theta; for a smooth f the bias falls as 1/N): `sample_size_curve` shows that drift.

The jackknife (Quenouille-Tukey, delete one group). The N batches form G >= 8 disjoint contiguous groups of
equal size; theta_(g) is the estimate with group g left out, theta_bar their mean. Then
    bias = (G - 1) (theta_bar - theta_hat)                          the 1/N bias of theta_hat, estimated
    value = theta_hat - bias                                        the bias-corrected estimate of theta
    standard_error = sqrt((G - 1) / G * sum_g (theta_(g) - theta_bar)^2)
    interval = value -+ t * standard_error, t = Student's t quantile (1 + level) / 2 with G - 1 d.o.f.
Meaning: an approximate `level` (default 68 %) confidence interval for theta: over repeated draws of the
batches it contains theta in about that fraction of draws. It is an interval for the population quantity, not
for the union estimate's own expectation at N batches. Approximate: the jackknife is exact only as G grows for
a smooth f. Coverage of nominal 68 % intervals on a synthetic population with known theta (per-sample PSD
outer products plus an indefinite part, n = 100; 8 groups of one batch), in 200 draws (tests/test_data_error.py)
and 1000 draws (benchmarks/data_error_calibration.py): lambda_max 69 % and 67 % (the same intervals without
the bias correction: 43 % and 46 %; the 2-halves "union +- std / sqrt(2)" this replaces: 34 % and 33 %),
trace 72 % and 67 %. It undercovers where the measured eigenvalue sits in a cluster narrower than the data
noise, where f is not smooth: lambda_min of that population, inside a cluster of width 0.08, 40 % of 1000.
Such records carry a `warning`: the estimated bias is then many standard errors (bias_to_standard_error > 3;
for a smooth f it shrinks as N^-1/2): 99.5 % of the lambda_min draws were flagged, 0.7 % of the lambda_max
ones.
On activation sites the operator is block diagonal, one block per batch, weighted 1/N: its extreme eigenvalue
is a maximum over batches with no population limit, and the record's `warning` says the interval means
nothing for it (its trace is a mean over batches, and keeps the meaning above).
The interval covers data sampling only. The solvers' own errors are separate: payload
`solver_error_propagated` = G r_union + (G - 1) mean(r_(g)) bounds their effect on `value` when each r bounds
its solve's error (a residual bound); a stochastic estimator is run with the same seed in every solve, so its
probes are held fixed and the interval is for its fixed-probe estimate.

Cost: the group operators are built once and every union is their reweighting (`batch_groups.py`); the
leave-one-out solves start from the union's top vector (`v0`) when the estimator takes `v0` and
`return_vectors` (lanczos), so they take fewer products (a dim-16 simplegpt, 8 groups, tol 1e-6: 8-14 per
leave-one-out solve against 11-18 from random starts; benchmarks/data_error_calibration.py). `hvp_cost` in
the payload counts them.
"""

from __future__ import annotations

import inspect
import math
import time

import numpy as np
from scipy import stats

from hessian_tools.errors import UserError
from hessian_tools.estimators.batch_groups import BatchGroups, check_combine, split_groups
from hessian_tools.records import Estimate

MIN_GROUPS = 8  # fewer leave-one-out values make the standard error itself too noisy to calibrate
DEFAULT_LEVEL = 0.68
BIAS_RATIO_LIMIT = 3.0  # |bias| / standard_error above this: the estimate is far from linear in the data


def warm_startable(estimator) -> bool:
    """True if `estimator` takes `v0` and `return_vectors` (lanczos does; power_iteration, traces do not)."""
    try:
        params = inspect.signature(estimator).parameters
    except (TypeError, ValueError):
        return False
    return "v0" in params and "return_vectors" in params


def _check_level(level) -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise UserError(f"level={level!r} must be a number strictly between 0 and 1, e.g. 0.68")
    return float(level)


def _solve(estimator, op, v0, warm: bool) -> Estimate:
    """estimator(op), warm-started from v0 (if its length fits) and keeping vectors when `warm`."""
    if not warm:
        return estimator(op)
    if v0 is not None and len(v0) != op.shape[0]:
        v0 = None
    return estimator(op, v0=v0, return_vectors=True)


def _top(est: Estimate):
    return None if est.vectors is None else est.vectors[:, 0]


def jackknife_statistics(union_value: float, leave_one_out: list[float], level: float) -> dict:
    """bias, bias-corrected value, standard error, t quantile and interval (see the module docstring)."""
    loo = np.asarray(leave_one_out, dtype=np.float64)
    g = len(loo)
    mean = float(loo.mean())
    bias = (g - 1) * (mean - union_value)
    value = union_value - bias
    se = math.sqrt((g - 1) / g * float(((loo - mean) ** 2).sum()))
    t = float(stats.t.ppf((1 + level) / 2, g - 1))
    ratio = abs(bias) / se if se > 0 else (0.0 if bias == 0 else None)
    return {"bias": bias, "value": value, "standard_error": se, "t_quantile": t, "degrees_of_freedom": g - 1,
            "interval": [value - t * se, value + t * se], "bias_to_standard_error": ratio}


def _warning(ratio: float | None, per_batch_extreme: bool) -> str | None:
    """Why the interval cannot be trusted, or None."""
    reasons = []
    if per_batch_extreme:
        reasons.append("the operator has one block per batch (activations): its extreme eigenvalue is the largest "
                       "over the batches, weighted by 1/N, which has no population limit, so the interval means "
                       "nothing for it (a trace is a mean over batches, and keeps its meaning)")
    if ratio is None or ratio > BIAS_RATIO_LIMIT:
        size = "more than any" if ratio is None else f"{ratio:.1f}"
        reasons.append(f"the estimated bias is {size} standard errors (limit {BIAS_RATIO_LIMIT:g}): the estimate is "
                       "far from linear in the data (a cluster at this end of the spectrum?) and the interval "
                       "undercovers")
    return "; ".join(reasons) or None


def jackknife(make_op, batches, estimator, n_groups: int = MIN_GROUPS, level: float = DEFAULT_LEVEL,
              union: Estimate | None = None, v0=None, combine: str = "auto") -> Estimate:
    """The delete-one-group jackknife interval for the population quantity that estimator(make_op(batches)) estimates.

    make_op(list_of_batches) -> operator (ParamHessian, ActivationHessian, a scaled operator, ...; see
    batch_groups.py for the contract); estimator(op) -> Estimate (e.g. functools.partial(lanczos, tol=1e-6)).
    len(batches) must be a multiple of n_groups >= 8 (contiguous equal groups). `union`: the estimate already
    made on make_op(batches) (with `vectors` for a warm start), else it is solved here, from `v0` if given.
    combine: "auto" (reweight the group operators where the check allows) or "rebuild" (make_op per union).
    Returns an Estimate: value = bias-corrected estimate, error = jackknife standard error, error_kind
    "jackknife", vectors = the union's; payload: union_value, union_solver_error, solver_error_kind,
    leave_one_out_values, leave_one_out_solver_errors, bias, standard_error, interval, level, t_quantile,
    degrees_of_freedom, solver_error_propagated, hvp_cost {union, leave_one_out (per solve), check, total},
    operators {combination, mismatch}, bias_to_standard_error, warning (None, or why the interval cannot be
    trusted); hvp_count = the products this call made (the union's only if it solved it: settings
    union_solved_here). A failed solve gives status "failed: ..." and null value and error, with the values
    computed so far kept in the payload.
    """
    groups = split_groups(batches, n_groups, MIN_GROUPS)
    level = _check_level(level)
    check_combine(combine)
    start, warm = time.perf_counter(), warm_startable(estimator)
    settings = {"method": "jackknife", "n_groups": n_groups, "group_size": len(groups[0]), "level": level,
                "warm_start": warm, "combine": combine, "union_solved_here": False}
    payload = {"union_value": None, "level": level}
    hvps = {"check": 0}
    everyone, loo, status, per_batch_space = list(range(n_groups)), [], "ok", False
    try:
        grouped = BatchGroups(make_op, groups, combine)
        hvps["check"] = grouped.check_hvps
        payload["operators"] = {"combination": grouped.how, "mismatch": grouped.mismatch}
        whole = grouped.operator(everyone)
        if union is None:
            union = _solve(estimator, whole, v0, warm)
            settings["union_solved_here"] = True
        if union.status != "ok":
            status = f"failed: the estimate on the union: {union.status}"
        for g in everyone if status == "ok" else []:
            rest = everyone[:g] + everyone[g + 1:]
            op = grouped.operator(rest)
            per_batch_space = op.shape[0] != whole.shape[0]
            est = _solve(estimator, op, grouped.restrict(_top(union), everyone, rest), warm)
            loo.append(est)
            if est.status != "ok":
                status = f"failed: leaving out group {g}: {est.status}"
                break
    except UserError as exc:
        status = f"failed: {exc}"
    if union is not None:
        payload.update(union_value=union.value, union_solver_error=union.error, solver_error_kind=union.error_kind)
        settings["estimator"] = union.settings
    hvps["union"] = union.hvp_count if union is not None else 0
    hvps["leave_one_out"] = [e.hvp_count for e in loo]
    hvps["total"] = hvps["union"] + sum(hvps["leave_one_out"]) + hvps["check"]
    spent = hvps["total"] - (0 if settings["union_solved_here"] else hvps["union"])
    payload.update(hvp_cost=hvps, leave_one_out_values=[e.value for e in loo],
                   leave_one_out_solver_errors=[e.error for e in loo])
    elapsed = time.perf_counter() - start
    converged = union is not None and union.converged and all(e.converged for e in loo)
    quantity = union.quantity if union is not None else "unknown"
    if status != "ok":
        return Estimate(quantity, None, None, "jackknife", False, spent, elapsed, settings,
                        payload=payload, status=status)
    jk = jackknife_statistics(union.value, payload["leave_one_out_values"], level)
    solver = [union.error] + payload["leave_one_out_solver_errors"]
    payload.update(bias=jk["bias"], standard_error=jk["standard_error"], interval=jk["interval"],
                   t_quantile=jk["t_quantile"], degrees_of_freedom=jk["degrees_of_freedom"],
                   bias_to_standard_error=jk["bias_to_standard_error"],
                   warning=_warning(jk["bias_to_standard_error"], per_batch_space and quantity != "trace"),
                   solver_error_propagated=None if None in solver else
                   n_groups * solver[0] + (n_groups - 1) * float(np.mean(solver[1:])))
    return Estimate(quantity, jk["value"], jk["standard_error"], "jackknife", converged, spent, elapsed,
                    settings, payload=payload, vectors=union.vectors)


def default_sizes(n_batches: int) -> list[int]:
    """1, 2, 4, ... below n_batches, then n_batches."""
    return [2 ** i for i in range(max(n_batches - 1, 0).bit_length()) if 2 ** i < n_batches] + [n_batches]


def sample_size_curve(make_op, batches, estimator, n_groups: int | None = None, level: float = DEFAULT_LEVEL,
                      sizes: list[int] | None = None, union: Estimate | None = None, combine: str = "auto") -> Estimate:
    """The estimate on nested prefixes of the batches (default 1, 2, 4, ..., N): how it moves with the data.

    Each point is estimator(make_op(batches[:n])) with its solver error; with `n_groups`, every prefix that is
    a multiple of n_groups (>= 8) also carries its jackknife record (see `jackknife`; level, combine as
    there). Each prefix is warm-started from the previous one's top vector where the lengths agree. `union`:
    the estimate already made on make_op(batches), used for the point at all the batches.
    Returns one Estimate: value, error, error_kind = the estimate on all the batches and its solver error;
    payload: points [{n_batches, value, solver_error, solver_error_kind, converged, status, hvp_count (the
    products this call made for the point), jackknife (the jackknife record's to_dict(), or None)}], sizes,
    n_groups, level. If a point fails, the
    record's status says which and value and error are null; every point computed is kept.
    """
    batches = list(batches)
    sizes = default_sizes(len(batches)) if sizes is None else list(sizes)
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) for s in sizes) or sizes != sorted(set(sizes)) \
            or not 1 <= sizes[0] <= sizes[-1] <= len(batches):
        raise UserError(f"sizes={sizes!r} must be increasing integers between 1 and the {len(batches)} batches")
    if n_groups is not None:
        split_groups(batches[:n_groups], n_groups, MIN_GROUPS)  # n_groups >= 8, and at least that many batches
    level = _check_level(level)
    check_combine(combine)
    start, warm = time.perf_counter(), warm_startable(estimator)
    points, v0, estimates = [], None, []
    for n in sizes:
        data, given = None, union if n == len(batches) else None
        if n_groups is not None and n % n_groups == 0:
            jk = jackknife(make_op, batches[:n], estimator, n_groups, level, union=given, v0=v0, combine=combine)
            data, p, spent = jk.to_dict(), jk.payload, jk.hvp_count
            est = Estimate(jk.quantity, p["union_value"], p.get("union_solver_error"),
                           p.get("solver_error_kind", "none"), jk.converged, spent, jk.wall_time_s,
                           jk.settings.get("estimator", {}), vectors=jk.vectors,
                           status="ok" if p["union_value"] is not None else jk.status)
        elif given is not None:
            est, spent = given, 0
        else:
            try:
                est = _solve(estimator, make_op(batches[:n]), v0, warm)
            except UserError as exc:
                est = Estimate("unknown", None, None, "none", False, 0, 0.0, status=f"failed: {exc}")
            spent = est.hvp_count
        estimates.append(est)
        v0 = _top(est) if est.vectors is not None else v0
        points.append({"n_batches": n, "value": est.value, "solver_error": est.error,
                       "solver_error_kind": est.error_kind, "converged": est.converged, "status": est.status,
                       "hvp_count": spent, "jackknife": data})
    failed = [(p["n_batches"], p["status"] if p["status"] != "ok" else p["jackknife"]["status"]) for p in points
              if p["status"] != "ok" or (p["jackknife"] and p["jackknife"]["status"] != "ok")]
    last = estimates[-1]
    settings = {"method": "sample-size-curve", "sizes": sizes, "n_groups": n_groups, "level": level,
                "warm_start": warm, "estimator": next((e.settings for e in estimates if e.settings), {})}
    payload = {"points": points, "sizes": sizes, "n_groups": n_groups, "level": level}
    status = "ok" if not failed else f"failed: at {failed[0][0]} batches: {failed[0][1]}"
    quantity = next((e.quantity for e in estimates if e.quantity != "unknown"), "unknown")
    ok = status == "ok"
    return Estimate(quantity, last.value if ok else None, last.error if ok else None, last.error_kind,
                    ok and all(e.converged for e in estimates), sum(p["hvp_count"] for p in points),
                    time.perf_counter() - start, settings, payload=payload, status=status)
