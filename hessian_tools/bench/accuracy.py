"""Time and HVPs to an accuracy, ours against the peers, on trained checkpoints and at init (float32 products).

For each model and one held-out batch: a float64 reference (Lanczos, tol 1e-10) of lambda_max, lambda_min and
the spectral norm ||H|| = max |lambda|. Then, per quantity, each tool's time and HVPs until its answer is
within ACCURACY (relative) of the reference:
- ours: Lanczos with tol = ACCURACY (which = largest, smallest, magnitude), its own stop (the guaranteed
  interval within ACCURACY); time includes building the operator. Our answer's true error is reported beside
  it. Also ours credited as the peers are ("ours oracle"): the smallest max_iter of LANCZOS_LADDER whose Ritz
  value is within ACCURACY, its time that run's.
- PyHessian and hessian-eigenthings' deflated power iteration find the dominant eigenvalue only (the
  spectral norm; lambda_max or lambda_min when it is the dominant one): credited with their first iterate
  within ACCURACY (an oracle stop, in their favour), 100 iterations at most.
- hessian-eigenthings' Lanczos has no stopping rule: the smallest max_iter of a ladder whose answer is within
  ACCURACY (oracle), its time that run's; curvlinops + eigsh: the loosest ARPACK tol of a ladder within it.
Each tool's default call is also run once per model, and its answer's true error reported.
Warm sweep: lambda_max at the 4 checkpoints of one run, ours warm-started from the previous checkpoint's Ritz
vector (mixed with 10 % noise, as `hessian_tools.sweep` does), against the fastest peer run cold on each.
Trace: Hutch++ with a budget of TRACE_BUDGET HVPs; our Hutchinson until Hutch++'s standard error (at most
TRACE_CAP probes); PyHessian's and hessian-eigenthings' estimators at the same budget with their errors.
XTrace at the same budget: its own error estimate is too small to match against (estimators/trace.py), so its
standard error is measured as the spread of XTRACE_SEEDS seeded runs, and our Hutchinson runs until that; the
sketch's share of ||H||_F^2 (payload sketch_frobenius_share, mean over the seeds) says how far the spectrum decays.
"""

from __future__ import annotations

import torch

from hessian_tools.bench import peers as P
from hessian_tools.bench.common import relative, timed

ACCURACY = 1e-3
LANCZOS_LADDER = (4, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100)
EIGSH_LADDER = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-6)
QUANTITIES = {"lambda_max": ("largest", "LA"), "lambda_min": ("smallest", "SA"), "spectral_norm": ("magnitude", "LM")}
POWER_ITER = 100
TRACE_BUDGET = 60
TRACE_CAP = 600
XTRACE_SEEDS = 8  # 3 in the quick part


def reference(model, batch) -> dict:
    from hessian_tools.estimators import lanczos
    from hessian_tools.operators import ParamHessian

    op = ParamHessian(model, [batch], dtype=torch.float64)
    both, seconds = timed(lambda: lanczos(op, which="both", tol=1e-10, max_iter=600))
    top, bottom = both.payload["eigenvalues"]
    return {"lambda_max": top, "lambda_min": bottom, "spectral_norm": max(abs(top), abs(bottom)),
            "dominant": top if abs(top) >= abs(bottom) else bottom, "hvps": both.hvp_count, "seconds": seconds,
            "converged": both.converged}


def ours(model, batch, which: str, tol: float = ACCURACY, v0=None, max_iter: int | None = None):
    from hessian_tools.estimators import lanczos
    from hessian_tools.operators import ParamHessian

    def solve():
        return lanczos(ParamHessian(model, [batch], dtype=torch.float32), which=which, tol=tol, v0=v0,
                       max_iter=max_iter, return_vectors=True)

    est, seconds = timed(solve)
    value = abs(est.value) if which == "magnitude" else est.value
    return {"value": value, "hvps": est.hvp_count, "seconds": seconds, "converged": est.converged}, est.vectors


def _ours_steps(model, batch, which: str, max_iter: int):
    """(our Ritz value after at most `max_iter` Lanczos steps, its HVP count), for the oracle ladder."""
    from types import SimpleNamespace

    mine, _ = ours(model, batch, which, tol=1e-12, max_iter=max_iter)
    return mine["value"], SimpleNamespace(hvps=mine["hvps"])


def _dominant_applies(quantity: str, ref: dict) -> bool:
    """Power iteration converges to the dominant eigenvalue: it answers `quantity` only where that is it."""
    return quantity == "spectral_norm" or ref[quantity] == ref["dominant"]


def peer_times(model, batch, quantity: str, ref: dict) -> dict:
    """{peer: {"hvps", "seconds", "reached"}} to ACCURACY on `quantity` (see the module docstring)."""
    target = ref[quantity]
    signed = ref["dominant"] if quantity == "spectral_norm" else target
    out = {}
    if _dominant_applies(quantity, ref):
        out["pyhessian power"] = attempt(lambda: _hit(P.pyhessian(
            model, batch, "eigenvalues", maxIter=POWER_ITER, tol=float("-inf"))[1], signed))
        out["eigenthings power"] = attempt(lambda: _hit(P.eigenthings(
            model, batch, "deflated_power_iteration", k=1, max_iter=POWER_ITER, tol=0.0)[1], signed))
    which = QUANTITIES[quantity][1]
    out["eigenthings lanczos"] = attempt(lambda: _ladder(
        LANCZOS_LADDER, target, lambda m: _eigenthings_lanczos(model, batch, which, m, quantity)))
    out["curvlinops eigsh"] = attempt(lambda: _ladder(
        EIGSH_LADDER, target, lambda tol: _signed(P.curvlinops_eigsh(model, batch, which, tol), quantity)))
    return out


def attempt(run) -> dict:
    """run(), or {"reached": False, "failed": its exception in one line} when the peer raises."""
    try:
        return run()
    except Exception as exc:  # a peer's own failure is a result to report
        return {"reached": False, "failed": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}


def _signed(pair, quantity):
    value, counted = pair
    return (abs(value) if quantity == "spectral_norm" else value), counted


def _eigenthings_lanczos(model, batch, which, max_iter, quantity):
    result, counted = P.eigenthings(model, batch, "lanczos", k=1, which=which, max_iter=max_iter, seed=0)
    return _signed((float(result.eigenvalues[0]), counted), quantity)


def _hit(counted, signed) -> dict:
    hit = counted.first_within(signed, ACCURACY)
    if hit is None:
        return {"hvps": counted.hvps, "seconds": counted.trace[-1][0], "reached": False}
    return {"hvps": hit[0], "seconds": hit[1], "reached": True}


def _ladder(settings, target, run) -> dict:
    for setting in settings:
        (value, counted), seconds = timed(lambda: run(setting))
        if relative(value, target) <= ACCURACY:
            return {"hvps": counted.hvps, "seconds": seconds, "reached": True, "setting": setting}
    return {"hvps": counted.hvps, "seconds": seconds, "reached": False, "setting": setting}


def defaults(model, batch, ref: dict, with_peers: bool) -> dict:
    """Each tool's default call: its answer, what it answers, the true relative error, HVPs and seconds."""
    from scipy.sparse.linalg import eigsh

    from hessian_tools.estimators import lanczos
    from hessian_tools.operators import ParamHessian

    rows = {}
    est, s = timed(lambda: lanczos(ParamHessian(model, [batch], dtype=torch.float32)))
    rows["ours lanczos()"] = _default_row(est.value, "lambda_max", ref, est.hvp_count, s)
    if not with_peers:
        return rows
    def peer_default(run, quantity):
        def row():
            (value, counted), seconds = timed(run)
            return _default_row(value, quantity, ref, counted.hvps, seconds)

        return attempt(row)

    def first(pair):
        result, counted = pair
        return float(result.eigenvalues[0]), counted

    def arpack():
        counted = P.Counted()
        _, linop = P.curvlinops_operator(model, batch, counted)
        return float(eigsh(linop, k=1, which="LA", return_eigenvectors=False)[0]), counted

    rows["pyhessian eigenvalues()"] = peer_default(
        lambda: (lambda r: (r[0][0][0], r[1]))(P.pyhessian(model, batch, "eigenvalues")), "dominant")
    rows["eigenthings lanczos(k=1)"] = peer_default(
        lambda: first(P.eigenthings(model, batch, "lanczos", k=1, seed=0)), "dominant")
    rows["eigenthings deflated_power_iteration(k=1)"] = peer_default(
        lambda: first(P.eigenthings(model, batch, "deflated_power_iteration", k=1, seed=0)), "dominant")
    rows["curvlinops + eigsh(k=1, which=LA)"] = peer_default(arpack, "lambda_max")
    return rows


def _default_row(value, quantity, ref, hvps, seconds) -> dict:
    return {"value": value, "answers": quantity, "rel_error": relative(value, ref[quantity]), "hvps": hvps,
            "seconds": seconds}


def model_rows(model, batch, with_peers: bool) -> dict:
    """Reference, ours and the peers on every quantity, and the defaults, for one model."""
    ref = reference(model, batch)
    out = {"reference": ref, "quantities": {}, "defaults": defaults(model, batch, ref, with_peers)}
    for quantity, (which, _) in QUANTITIES.items():
        mine, _ = ours(model, batch, which)
        mine["rel_error"] = relative(mine["value"], ref[quantity])
        oracle = _ladder(LANCZOS_LADDER, ref[quantity], lambda m: _ours_steps(model, batch, which, m))
        row = {"ours": mine, "ours_oracle": oracle,
               "peers": peer_times(model, batch, quantity, ref) if with_peers else {}}
        reached = {k: p for k, p in row["peers"].items() if p["reached"]}
        if reached:
            fastest = min(reached, key=lambda k: reached[k]["seconds"])
            row["fastest_peer"] = fastest
            row["speedup"] = reached[fastest]["seconds"] / mine["seconds"]
            if oracle["reached"]:
                row["oracle_speedup"] = reached[fastest]["seconds"] / oracle["seconds"]
        out["quantities"][quantity] = row
    return out


def warm_sweep(models: list, batch, with_peers: bool) -> dict:
    """lambda_max at each of `models` (one run's checkpoints in order): ours warm and cold, the fastest peer cold."""
    rows, v0 = [], None
    for model in models:
        ref = reference(model, batch)
        cold, _ = ours(model, batch, "largest")
        warm, vectors = ours(model, batch, "largest", v0=v0)  # lanczos mixes seeded noise into v0 itself
        v0 = vectors[:, 0].cpu()
        row = {"reference": ref["lambda_max"], "warm": warm, "cold": cold,
               "warm_rel_error": relative(warm["value"], ref["lambda_max"])}
        if with_peers:
            reached = {k: p for k, p in peer_times(model, batch, "lambda_max", ref).items() if p["reached"]}
            if reached:
                row["fastest_peer"] = min(reached, key=lambda k: reached[k]["seconds"])
                row["peer_seconds"] = reached[row["fastest_peer"]]["seconds"]
        rows.append(row)
    out = {"checkpoints": rows, "ours_warm_s": sum(r["warm"]["seconds"] for r in rows),
           "ours_cold_s": sum(r["cold"]["seconds"] for r in rows)}
    if with_peers and all("peer_seconds" in r for r in rows):
        out["peer_cold_s"] = sum(r["peer_seconds"] for r in rows)
        out["speedup"] = out["peer_cold_s"] / out["ours_warm_s"]
    return out


def trace_rows(model, batch, with_peers: bool, xtrace_seeds: int = XTRACE_SEEDS) -> dict:
    """Hutch++ at TRACE_BUDGET; Hutchinson until its standard error; XTrace at TRACE_BUDGET over xtrace_seeds seeds
    and Hutchinson until their spread; the peers' estimators at the same budget."""
    import math
    import statistics

    from hessian_tools.estimators import hutchinson_trace, hutchpp_trace, xtrace_trace
    from hessian_tools.operators import ParamHessian

    def op():
        return ParamHessian(model, [batch], dtype=torch.float32)

    def hutchinson_to(target):
        h, s = timed(lambda: hutchinson_trace(op(), n_samples=TRACE_CAP, max_samples=TRACE_CAP,
                                              target_std_error=target))
        return {"value": h.value, "std_error": h.error, "hvps": h.hvp_count, "seconds": s, "reached": h.converged}

    pp, s = timed(lambda: hutchpp_trace(op(), n_matvecs=TRACE_BUDGET))
    out = {"hutchpp": {"value": pp.value, "std_error": pp.error, "hvps": pp.hvp_count, "seconds": s}}
    out["hutchinson"] = hutchinson_to(pp.error)
    out["hvp_ratio"] = out["hutchinson"]["hvps"] / pp.hvp_count  # a lower bound when Hutchinson stopped at the cap
    runs = [timed(lambda seed=seed: xtrace_trace(op(), n_matvecs=TRACE_BUDGET, seed=seed))
            for seed in range(xtrace_seeds)]
    values = [r.value for r, _ in runs]
    out["xtrace"] = {"value": values[0], "std_error": statistics.stdev(values),  # one run: seed 0, its measured SE
                     "hvps": runs[0][0].hvp_count, "seconds": statistics.fmean(s for _, s in runs),
                     "seeds": xtrace_seeds, "values": values, "own_error": statistics.fmean(r.error for r, _ in runs),
                     "probes": len(runs[0][0].payload["loo_estimates"]), "n": runs[0][0].settings["operator"]["n"],
                     "sketch_share": statistics.fmean(r.payload["sketch_frobenius_share"] for r, _ in runs)}
    out["hutchinson to xtrace"] = hutchinson_to(out["xtrace"]["std_error"])
    out["xtrace_hvp_ratio"] = out["hutchinson to xtrace"]["hvps"] / out["xtrace"]["hvps"]  # a lower bound at the cap
    if with_peers:
        samples, counted = P.pyhessian(model, batch, "trace", maxIter=TRACE_BUDGET, tol=float("-inf"))
        out["pyhessian trace()"] = {"value": statistics.fmean(samples), "hvps": counted.hvps,
                                    "std_error": statistics.stdev(samples) / math.sqrt(len(samples))}
        for name, kwargs in (("hutchinson", {"num_samples": TRACE_BUDGET}),
                             ("hutch_plus_plus", {"num_matvecs": TRACE_BUDGET})):
            def run(name=name, kwargs=kwargs):
                result, counted = P.eigenthings(model, batch, name, seed=0, **kwargs)
                return {"value": result.estimate, "std_error": result.stderr, "hvps": counted.hvps}

            out[f"eigenthings {name}"] = attempt(run)
        for name in ("hutchpp_trace", "xtrace"):
            def run(name=name):
                value, counted = P.curvlinops_trace(model, batch, name, TRACE_BUDGET)
                return {"value": value, "std_error": None, "hvps": counted.hvps}

            out[f"curvlinops {name}"] = attempt(run)
    return out
