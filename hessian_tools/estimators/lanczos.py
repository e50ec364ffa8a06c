"""Extreme eigenvalues of a symmetric operator by Lanczos, each with an interval that says what holds.

What a run of m steps knows (H symmetric, theta_1 >= ... >= theta_m the Ritz values, r_i the residual bound of
Ritz pair i, `guarantees` and `krylov` for the derivations):
- interlacing, certified: theta_1 <= lambda_max and theta_m >= lambda_min (theta_i <= lambda_i for the i-th
  largest), to the arithmetic's slack: the propagated column errors and the floor 10 m eps ||T||;
- residual bound, certified: SOME eigenvalue lies in [theta_i - r_i, theta_i + r_i], not necessarily lambda_i (a
  cluster or a start blind to the top eigenvector hides larger ones: the review's 24 misses in 40 clustered trials);
- polynomial bound, probabilistic: lambda_max <= x* except with probability `failure_probability` over the
  Gaussian part of the start, x* from the Lanczos polynomial and the start's guaranteed component
  (`guarantees`). It needs no gap; it is wide while a cluster is unresolved and narrows once the Ritz values
  separate. After a restart (an invariant subspace was found) it is applied to the last block that took a step,
  whose start is a fresh Gaussian projected off the earlier blocks: those span invariant subspaces, their Ritz
  values are eigenvalues, and the bound covers the complement. The bottom end is the same bound for -H.
- Kato-Temple |lambda - theta| <= r^2 / gap needs the gap to the rest of the spectrum, which a single start cannot
  bound: it is reported as an estimate (payload["kato_temple"]["kind"] = "estimate") and never used as an error.

Record conventions. value = the extreme Ritz value (the best estimate); payload["interval"] = [lo, hi] for the
record's quantity (for "magnitude" and spectral_norm: for |lambda|_max = ||H||_2); error = max(value - lo,
hi - value) (with |value| for magnitude), so value +- error contains the interval: the half-width a plot draws.
error_kind: "probabilistic" (one side certified, payload["certified_side"], the other failing with probability
payload["failure_probability"]); "certified" once the basis spans the whole space; "measured" when a float32
operator's rounding enters through a measured bound (payload["rounding"]) rather than the arithmetic; "estimate"
for a float32 operator whose rounding could not be measured (no float64 twin, no `rounding` given).
`converged`: the error's Lanczos part is within tol * |theta| for every end the record needs (the residual for
further wanted values), or below the arithmetic's slack (payload["limited_by_rounding"]: a float32 operator stops
at its rounding floor instead of chasing tol).

Warm starts: v0 is never trusted alone. The start is v0 / ||v0|| + (WARM_START_NOISE / sqrt(n)) g, g Gaussian from
a generator seeded by `seed` and a hash of v0 (so a v0 built from an earlier run with the same seed does not reuse
its Gaussian); the bound rests on g alone, so an orthogonal v0 cannot hide lambda_max. A warm start speeds up the
estimate (the residual falls faster), not the guarantee, whose cost is that of amplifying g.
"""

from __future__ import annotations

import hashlib
import math
import time

import numpy as np
import torch

from hessian_tools.errors import UserError
from hessian_tools.estimators import _common as c
from hessian_tools.estimators.guarantees import measured_rounding, polynomial_bound, start_floor
from hessian_tools.estimators.krylov import KrylovBasis
from hessian_tools.records import Estimate

WHICH = ("largest", "smallest", "both", "magnitude")
QUANTITY = {"largest": "lambda_max", "smallest": "lambda_min", "both": "lambda_max", "magnitude": "lambda_absmax"}
ENDS = {"largest": ("top",), "smallest": ("bottom",), "both": ("top", "bottom"), "magnitude": ("top", "bottom")}
KATO_TEMPLE_MIN_GAP = 10  # report r^2 / gap only where the estimated gap exceeds this many residuals
WARM_START_NOISE = 1.0  # norm of the Gaussian mixed into a warm start, relative to the unit warm vector
RELATIVE_FLOOR = 1e-8  # tol is relative to max(|theta|, RELATIVE_FLOOR ||T||): eigenvalues near 0
STEPS_AFTER_RESTART = 5  # values beyond the extreme ones (k > 1) are not declared converged this soon after an
# invariant subspace: the restart must get the chance to find further copies of a repeated eigenvalue


def _wanted(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices of the wanted Ritz values in report order (theta ascending)."""
    m = len(theta)
    if which == "largest":
        return np.arange(m - 1, max(m - k, 0) - 1, -1)
    if which == "smallest":
        return np.arange(min(k, m))
    if which == "magnitude":
        return np.argsort(-np.abs(theta), kind="stable")[:k]
    top = list(range(m - 1, max(m - k, 0) - 1, -1))
    return np.array(top + [i for i in range(min(k, m)) if i not in top])


def _kato_temple(theta: np.ndarray, residuals: np.ndarray, i: int, floor: float) -> tuple[float | None, float | None]:
    """(r_i^2 / gap + floor, estimated gap) for Ritz value i; (None, gap) where gap < KATO_TEMPLE_MIN_GAP r_i."""
    others = np.delete(np.arange(len(theta)), i)
    if len(others) == 0:
        return None, None
    gap = float(np.min(np.abs(theta[others] - theta[i]) - residuals[others]))
    if gap <= KATO_TEMPLE_MIN_GAP * residuals[i]:
        return None, gap
    return float(residuals[i] ** 2 / gap + floor), gap


def _start_vector(op, v0, seed: int, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """(start s, sigma: the standard deviation of its Gaussian part); see the module docstring. For a sharded op,
    s is this rank's rows, v0 is made whole first (`_common.whole`) so that every rank hashes the same vector."""
    n, device = c.dimension(op), c.device_of(op)
    if v0 is None:
        return c.gaussian(op, gen), 1.0
    v0 = c.whole(op, torch.as_tensor(v0).to(device=device))
    if v0.ndim != 1 or v0.numel() != n:
        shard = getattr(op, "shard", None)
        also = f" or this rank's shard ({shard.local_n},)" if shard is not None else ""
        raise UserError(f"v0 has shape {tuple(v0.shape)}, expected ({n},){also}: pass a flat vector of the "
                        "operator's size")
    v0 = v0.to(dtype=c.FLOAT)
    norm = float(torch.linalg.vector_norm(v0))
    if not bool(torch.isfinite(v0).all()) or norm == 0.0:
        raise UserError("v0 is zero or not finite: pass a non-zero start vector or v0=None")
    digest = hashlib.sha256(v0.detach().cpu().numpy().tobytes() + str(seed).encode()).digest()
    noise = c.gaussian(op, c.generator(int.from_bytes(digest[:7], "little")))
    sigma = WARM_START_NOISE / math.sqrt(n)
    return c.local(op, v0) / norm + sigma * noise, sigma


class _Ends:
    """The certified and probabilistic bounds at the top and bottom of the spectrum after the current step."""

    def __init__(self, basis: KrylovBasis, theta, S, sigma0: float, delta_each: float, ends):
        self.floor = basis.floor(theta)
        self.slack = basis.propagated_error(S) + self.floor  # certified side, per Ritz value
        self.upper_slack = math.sqrt(2) * float(np.linalg.norm(basis.column_errors)) + self.floor  # ||H - H'||
        self.exhausted = basis.exhausted
        self.certified = {"top": float(theta[-1] - self.slack[-1]), "bottom": float(theta[0] + self.slack[0])}
        self.probable, self.lanczos_part = {}, {}
        if self.exhausted:  # the Ritz values are the eigenvalues of H', within ||H - H'|| of H's
            self.probable = {"top": float(theta[-1] + self.upper_slack), "bottom": float(theta[0] - self.upper_slack)}
            self.lanczos_part = {"top": 0.0, "bottom": 0.0}
            return
        b, block, log_beta, start_norm = basis.last_block()
        earlier = basis.blocks_before(b)
        sigma = sigma0 if b == 0 else 1.0
        floor = start_floor(delta_each, sigma, start_norm) - basis.start_roundings[b]  # |u.q_stored| >= this
        for end in ends:
            sign = 1.0 if end == "top" else -1.0
            extreme = float(np.max(sign * block)) + (polynomial_bound(sign * block, log_beta, floor) if floor > 0
                                                     else math.inf)
            if earlier is not None:
                extreme = max(extreme, max(sign * earlier[0], sign * earlier[1]))
            self.probable[end] = sign * (extreme + self.upper_slack)
            self.lanczos_part[end] = extreme - float(sign * (theta[-1] if end == "top" else theta[0]))


def _assess(basis: KrylovBasis, k: int, which: str, tol: float, sigma0: float, delta: float) -> dict:
    """Everything the record reports after the current step, and whether it has converged."""
    theta, S, res = basis.ritz()
    idx = _wanted(theta, k, which)
    ends = _Ends(basis, theta, S, sigma0, delta / len(ENDS[which]), ENDS[which])
    scale = RELATIVE_FLOOR * float(np.max(np.abs(theta)))
    target = lambda t: tol * max(abs(t), scale)  # noqa: E731
    if which == "magnitude":
        dominant = int(idx[0])
        lo = max(ends.certified["top"], -ends.certified["bottom"], 0.0)
        hi = max(ends.probable["top"], -ends.probable["bottom"])
        checks = [(hi - ends.upper_slack - abs(theta[dominant]), target(theta[dominant]), ends.upper_slack)]
    else:
        end = "bottom" if which == "smallest" else "top"
        lo, hi = (ends.probable["bottom"], ends.certified["bottom"]) if end == "bottom" else \
            (ends.certified["top"], ends.probable["top"])
        checks = [(ends.lanczos_part[e], target(theta[-1] if e == "top" else theta[0]), ends.upper_slack)
                  for e in ENDS[which]]
    extremes = {0, len(theta) - 1}
    checks += [(res[i] - ends.slack[i], target(theta[i]), ends.slack[i]) for i in idx if i not in extremes]
    restarted = basis.breakdowns and basis.m - basis.block_starts[-1] < STEPS_AFTER_RESTART
    converged = all(part <= max(goal, slack) for part, goal, slack in checks) and not (
        restarted and any(i not in extremes for i in idx))
    limited = any(goal < slack for _, goal, slack in checks)
    return {"theta": theta, "S": S, "res": res, "idx": idx, "ends": ends, "interval": [float(lo), float(hi)],
            "converged": converged or basis.exhausted, "limited": limited}


def _intervals(a: dict, which: str, k: int) -> list[list[float]]:
    """Per wanted eigenvalue, [lo, hi] for that eigenvalue itself (the i-th largest / smallest / magnitude)."""
    theta, ends, idx = a["theta"], a["ends"], a["idx"]
    out = []
    for rank, i in enumerate(idx):
        s = float(ends.slack[i])
        if ends.exhausted:
            out.append([float(theta[i] - ends.upper_slack), float(theta[i] + ends.upper_slack)])
        elif which == "magnitude":
            out.append([max(abs(float(theta[i])) - s, 0.0), a["interval"][1]])
        elif which == "smallest" or (which == "both" and rank >= min(k, len(theta))):
            out.append([ends.probable["bottom"], float(theta[i] + s)])
        else:
            out.append([float(theta[i] - s), ends.probable["top"]])
    return out


def _cluster(a: dict, end: str, width: float) -> dict:
    """The Ritz values chained to the extreme one by gaps of at most `width`, and an interval enclosing the
    eigenvalues they stand for: each lies within its residual of an eigenvalue, the extreme within the bound."""
    theta, res, ends = a["theta"], a["res"], a["ends"]
    order = np.arange(len(theta))[::-1] if end == "top" else np.arange(len(theta))
    members = [int(order[0])]
    for i in order[1:]:
        if abs(theta[members[-1]] - theta[i]) > width:
            break
        members.append(int(i))
    values, radii = theta[members], res[members]
    interval = ([float(np.min(values - radii)), ends.probable["top"]] if end == "top"
                else [ends.probable["bottom"], float(np.max(values + radii))])
    return {"size": len(members), "ritz_values": values.tolist(), "residuals": radii.tolist(), "interval": interval}


def lanczos(op, k: int = 1, which: str = "largest", tol: float = 1e-6, max_iter: int | None = None,
            seed: int = 0, v0=None, return_vectors: bool = False, failure_probability: float = 1e-3,
            rounding: float | None = None, basis_dtype: torch.dtype = torch.float64,
            basis_budget: int | None = None) -> Estimate:
    """k extreme eigenvalues of the symmetric operator `op` (shape (n, n)) by Lanczos, with intervals.

    which: "largest" / "smallest" (k algebraically largest / smallest), "both" (k of each end),
    "magnitude" (k largest |lambda|). Stops when converged (module docstring: the error is within tol * |theta|,
    or at the rounding floor) or after max_iter steps (default min(n, 100 + 10 k), capped at n).
    v0: a warm start, always mixed with seeded Gaussian noise (module docstring); default a Gaussian from `seed`.
    For a sharded op (`_common`) v0 is the whole vector (n,) or this rank's shard (local_n,), the same kind on
    every rank (a shard is assembled once, an n-length all-reduce), and Ritz vectors come back as this rank's rows.
    failure_probability: the probability allowed to the uncertified side of every interval (split over both ends
    for "both" and "magnitude"). rounding: a bound on the operator's relative product rounding; default 0 for
    float64 operators, measured for float32 ones through op.with_dtype(float64): one float64 product of the first
    Lanczos vector, compared with that vector's float32 product rebuilt from the basis (`guarantees`).
    Returns an Estimate (module docstring for value, error, error_kind); payload: interval, certified_side,
    failure_probability, eigenvalues, residuals and residual_intervals (certified: some eigenvalue in each),
    intervals (per wanted eigenvalue), clusters, kato_temple (an estimate), ritz_values, lambda_max_lower_bound,
    lambda_min_upper_bound (certified), lambda_max_upper_bound / lambda_min_lower_bound (probabilistic, where
    computed), rounding, limited_by_rounding, steps, breakdowns. return_vectors=True puts the (n, #wanted) Ritz
    vectors in `vectors`. Memory: 8 n (steps + 1) bytes of basis, 4 n (steps + 1) with basis_dtype=float32 (the
    arithmetic stays float64; `krylov` for what the float32 storage costs in accuracy: about m eps32 ||T||).
    basis_budget: bytes the basis may take; max_iter is lowered to fit it (settings["max_iter"], and
    settings["max_iter_limited_by"] = "basis_budget"), so a large model stops unconverged instead of running out of
    memory; for a sharded op, the bytes each rank's rows of the basis may take (sized by the largest rank's).
    """
    n = c.dimension(op)
    if which not in WHICH:
        raise UserError(f"which={which!r} must be one of {', '.join(WHICH)}")
    k = c.positive_int("k", k)
    if k > n:
        raise UserError(f"k={k} exceeds the operator dimension {n}: ask for at most {n} eigenvalues")
    tol = c.positive_float("tol", tol)
    delta = c.positive_float("failure_probability", failure_probability)
    if delta >= 1:
        raise UserError(f"failure_probability={failure_probability!r} must lie in (0, 1)")
    if rounding is not None and (not isinstance(rounding, (int, float)) or not rounding >= 0):
        raise UserError(f"rounding={rounding!r} must be a non-negative number (relative product rounding)")
    n_wanted = min(2 * k, n) if which == "both" else k
    max_iter = min(n, 100 + 10 * n_wanted) if max_iter is None else min(n, c.positive_int("max_iter", max_iter))
    if basis_dtype not in (torch.float64, torch.float32):
        raise UserError(f"basis_dtype={basis_dtype!r} must be torch.float64 or torch.float32")
    limited_by = None
    if basis_budget is not None:
        per_vector = basis_dtype.itemsize * c.stored_length(op)
        fits = int(c.positive_float("basis_budget", basis_budget) // per_vector) - 1
        if fits < max_iter:
            max_iter, limited_by = fits, "basis_budget"
    if max_iter < n_wanted:
        raise UserError(f"max_iter={max_iter} is below the {n_wanted} eigenvalues wanted; raise "
                        f"{'basis_budget (or store the basis in float32)' if limited_by else 'max_iter'}")
    gen = c.generator(seed)
    settings = {"method": "lanczos", "k": k, "which": which, "tol": tol, "max_iter": max_iter,
                "max_iter_limited_by": limited_by, "basis_dtype": str(basis_dtype).removeprefix("torch."),
                "basis_budget_bytes": basis_budget, "seed": seed,
                "failure_probability": delta, "warm_start": v0 is not None,
                "warm_start_noise": WARM_START_NOISE if v0 is not None else None,
                "reorthogonalization": "full, classical Gram-Schmidt twice", "operator": c.operator_settings(op)}
    start, hvp0, extra = time.perf_counter(), op.hvp_count, 0
    s, sigma = _start_vector(op, v0, seed, gen)
    basis = None
    measure, stage = rounding is None, None
    try:
        basis = KrylovBasis(op, s, max_iter, gen, rounding or 0.0, storage=basis_dtype)
        a = None
        while basis.m < max_iter and not basis.exhausted:
            basis.step()
            if measure and basis.m == 1:
                stage = "measuring rounding"
                rounding, extra = measured_rounding(op, *basis.first_product())
                basis.rounding, stage = rounding or 0.0, None
            a = None
            if basis.m >= n_wanted:
                a = _assess(basis, k, which, tol, sigma, delta)
                if a["converged"]:
                    break
    except c.NonFiniteProduct as exc:
        return Estimate(QUANTITY[which], None, None, "none", False, op.hvp_count - hvp0 + extra,
                        time.perf_counter() - start, settings,
                        status=f"failed {stage}: {exc}" if stage else f"failed at step {basis.m + 1}: {exc}")
    a = a or _assess(basis, k, which, tol, sigma, delta)
    theta, S, res, idx, ends = a["theta"], a["S"], a["res"], a["idx"], a["ends"]
    lo, hi = a["interval"]
    value = float(theta[idx[0]])
    error = max(abs(value) - lo, hi - abs(value)) if which == "magnitude" else max(value - lo, hi - value)
    kind = ("estimate" if rounding is None else "measured" if rounding > 0
            else "certified" if ends.exhausted else "probabilistic")
    kato, gaps = zip(*(_kato_temple(theta, res, i, ends.floor) for i in idx))
    width = max(tol * abs(value), error)
    payload = {
        "interval": [lo, hi],
        "certified_side": "both" if ends.exhausted else "upper" if which == "smallest" else "lower",
        "failure_probability": 0.0 if ends.exhausted else delta,
        "eigenvalues": theta[idx].tolist(),
        "residuals": res[idx].tolist(),
        "residual_intervals": [[float(t - r), float(t + r)] for t, r in zip(theta[idx], res[idx])],
        "intervals": _intervals(a, which, k),
        "clusters": {end: _cluster(a, end, width) for end in ENDS[which]},
        "kato_temple": {"kind": "estimate", "values": list(kato), "gaps": list(gaps)},
        "ritz_values": theta.tolist(),
        "lambda_max_lower_bound": ends.certified["top"],
        "lambda_min_upper_bound": ends.certified["bottom"],
        **({"lambda_max_upper_bound": ends.probable["top"]} if "top" in ends.probable else {}),
        **({"lambda_min_lower_bound": ends.probable["bottom"]} if "bottom" in ends.probable else {}),
        "rounding": rounding,
        "limited_by_rounding": a["limited"],
        "steps": basis.m,
        "breakdowns": basis.breakdowns,
    }
    vectors = basis.ritz_vectors(S[:, idx]) if return_vectors else None
    return Estimate(QUANTITY[which], value, error, kind, a["converged"], op.hvp_count - hvp0 + extra,
                    time.perf_counter() - start, settings, payload=payload, vectors=vectors)


def spectral_norm(op, tol: float = 1e-6, max_iter: int | None = None, seed: int = 0, v0=None,
                  failure_probability: float = 1e-3, rounding: float | None = None,
                  basis_dtype: torch.dtype = torch.float64, basis_budget: int | None = None) -> Estimate:
    """||H||_2 = max(|lambda_max|, |lambda_min|) by Lanczos with which="magnitude" (H may be indefinite).

    value = |theta| of the largest-magnitude Ritz value; interval and error as lanczos's (for ||H||_2: the lower
    side certified by interlacing, the upper probabilistic); payload: lanczos's plus signed_eigenvalue.
    """
    est = lanczos(op, k=1, which="magnitude", tol=tol, max_iter=max_iter, seed=seed, v0=v0,
                  failure_probability=failure_probability, rounding=rounding, basis_dtype=basis_dtype,
                  basis_budget=basis_budget)
    if est.status != "ok":
        return Estimate("spectral_norm", None, None, "none", False, est.hvp_count, est.wall_time_s, est.settings,
                        status=est.status)
    payload = {**est.payload, "signed_eigenvalue": est.value}
    return Estimate("spectral_norm", abs(est.value), est.error, est.error_kind, est.converged, est.hvp_count,
                    est.wall_time_s, {**est.settings, "method": "lanczos-magnitude"}, payload=payload)
