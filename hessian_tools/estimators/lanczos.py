"""Extreme eigenvalues of a symmetric operator by Lanczos, with certified residual bounds.

Bounds (H symmetric, y a unit Ritz vector, theta its Ritz value, r = ||H y - theta y|| = |beta_m s_mi|):
- residual bound (Weyl / Bauer-Fike): some eigenvalue of H lies in [theta - r, theta + r]. Certified.
- Kato-Temple: |lambda - theta| <= r^2 / gap, where gap is the distance from theta to the rest of the
  spectrum. The gap is estimated from the other Ritz values as min_j (|theta_j - theta| - r_j), so this
  bound is an estimate; it is reported only where the estimated gap exceeds 10 r. It holds for the
  extreme eigenvalues once their neighbours have settled; inside a cluster the Ritz values have not yet
  resolved, the estimated gap is too large and the bound can fail. Certify with the residual bound.
- Interlacing: the top Ritz value is a certified lower bound on lambda_max, the bottom one an upper bound
  on lambda_min, and max |theta| a lower bound on ||H||_2. Attributing [theta_1 - r_1, theta_1 + r_1] to
  lambda_max itself assumes no larger eigenvalue was missed (true with probability 1 for a random start).
  A single start vector finds one copy of a repeated eigenvalue; further copies appear only after an
  invariant subspace is exhausted and the recurrence restarts.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from hessian_tools.errors import UserError
from hessian_tools.estimators import _common as c
from hessian_tools.estimators.krylov import KrylovBasis
from hessian_tools.records import Estimate

WHICH = ("largest", "smallest", "both", "magnitude")
QUANTITY = {"largest": "lambda_max", "smallest": "lambda_min", "both": "lambda_max", "magnitude": "lambda_absmax"}
KATO_TEMPLE_MIN_GAP = 10  # report r^2 / gap only where the estimated gap exceeds this many residuals
STEPS_AFTER_RESTART = 5  # no convergence is declared this soon after an invariant subspace


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


def _kato_temple(theta: np.ndarray, residuals: np.ndarray, i: int,
                 rounding: float) -> tuple[float | None, float | None]:
    """(r_i^2 / gap + rounding, estimated gap) for Ritz value i; (None, gap) where gap < KATO_TEMPLE_MIN_GAP r_i."""
    others = np.delete(np.arange(len(theta)), i)
    if len(others) == 0:
        return None, None
    gap = float(np.min(np.abs(theta[others] - theta[i]) - residuals[others]))
    if gap <= KATO_TEMPLE_MIN_GAP * residuals[i]:
        return None, gap
    return float(residuals[i] ** 2 / gap + rounding), gap


def _start_vector(n: int, v0, gen: torch.Generator, device) -> torch.Tensor:
    if v0 is None:
        return torch.randn(n, generator=gen, dtype=c.FLOAT).to(device)
    v0 = torch.as_tensor(v0)
    if v0.ndim != 1 or v0.numel() != n:
        raise UserError(f"v0 has shape {tuple(v0.shape)}, expected ({n},): pass a flat vector of the operator's size")
    v0 = v0.to(device=device, dtype=c.FLOAT)
    if not bool(torch.isfinite(v0).all()) or float(torch.linalg.vector_norm(v0)) == 0.0:
        raise UserError("v0 is zero or not finite: pass a non-zero start vector or v0=None")
    return v0


def lanczos(op, k: int = 1, which: str = "largest", tol: float = 1e-6, max_iter: int | None = None,
            seed: int = 0, v0=None, return_vectors: bool = False) -> Estimate:
    """k extreme eigenvalues of the symmetric operator `op` (shape (n, n)) by Lanczos.

    which: "largest" / "smallest" (k algebraically largest / smallest), "both" (k of each end),
    "magnitude" (k largest |lambda|). Stops when every wanted Ritz pair has residual
    |beta_m s_mi| <= tol * |theta_i| (relative; the floor tol * 1e-8 * ||T|| serves eigenvalues near 0),
    or after max_iter HVPs (default min(n, 100 + 10 k), capped at n; not converged then).
    v0: a start vector (e.g. a previous top eigenvector for a warm start); default Gaussian from `seed`.
    Returns an Estimate: value = the extreme wanted eigenvalue (see QUANTITY), error = its residual bound;
    payload: eigenvalues, residuals, bounds (intervals), kato_temple, gaps, ritz_values, steps, breakdowns,
    lambda_max_lower_bound, lambda_min_upper_bound (certified by interlacing). return_vectors=True puts
    the (n, #wanted) Ritz vectors in `vectors`. Memory: 8 n (steps + 1) bytes of float64 basis.
    """
    n = c.dimension(op)
    if which not in WHICH:
        raise UserError(f"which={which!r} must be one of {', '.join(WHICH)}")
    k = c.positive_int("k", k)
    if k > n:
        raise UserError(f"k={k} exceeds the operator dimension {n}: ask for at most {n} eigenvalues")
    tol = c.positive_float("tol", tol)
    n_wanted = min(2 * k, n) if which == "both" else k
    max_iter = min(n, 100 + 10 * n_wanted) if max_iter is None else min(n, c.positive_int("max_iter", max_iter))
    if max_iter < n_wanted:
        raise UserError(f"max_iter={max_iter} is below the {n_wanted} eigenvalues wanted; raise max_iter")
    gen = c.generator(seed)
    device = c.device_of(op)
    settings = {"method": "lanczos", "k": k, "which": which, "tol": tol, "max_iter": max_iter, "seed": seed,
                "warm_start": v0 is not None, "reorthogonalization": "full, classical Gram-Schmidt twice",
                "operator": c.operator_settings(op)}
    start, hvp0 = time.perf_counter(), op.hvp_count
    basis = KrylovBasis(op, _start_vector(n, v0, gen, device), max_iter, gen)
    converged, last_restart = False, 0
    try:
        while basis.m < max_iter and not basis.exhausted:
            breakdowns = basis.breakdowns
            basis.step()
            if basis.breakdowns > breakdowns:
                last_restart = basis.m
            if basis.m < n_wanted:
                continue
            if not basis.exhausted and basis.breakdowns and basis.m - last_restart < STEPS_AFTER_RESTART:
                continue
            theta, _, res = basis.ritz()
            idx = _wanted(theta, k, which)
            floor = 1e-8 * float(np.max(np.abs(theta)))
            if np.all(res[idx] <= tol * np.maximum(np.abs(theta[idx]), floor)):
                converged = True
                break
    except c.NonFiniteProduct as exc:
        return Estimate(QUANTITY[which], None, None, "residual-bound", False, op.hvp_count - hvp0,
                        time.perf_counter() - start, settings, status=f"failed at step {basis.m + 1}: {exc}")
    converged = converged or basis.m == n  # the basis spans the whole space: Ritz values are the eigenvalues
    theta, S, res = basis.ritz()
    idx = _wanted(theta, k, which)
    kato, gaps = zip(*(_kato_temple(theta, res, i, basis.rounding(theta)) for i in idx))
    payload = {
        "eigenvalues": theta[idx].tolist(),
        "residuals": res[idx].tolist(),
        "bounds": [[float(t - r), float(t + r)] for t, r in zip(theta[idx], res[idx])],
        "kato_temple": list(kato),
        "gaps": list(gaps),
        "ritz_values": theta.tolist(),
        "lambda_max_lower_bound": float(theta[-1]),
        "lambda_min_upper_bound": float(theta[0]),
        "steps": basis.m,
        "breakdowns": basis.breakdowns,
    }
    vectors = basis.ritz_vectors(S[:, idx]) if return_vectors else None
    return Estimate(QUANTITY[which], float(theta[idx[0]]), float(res[idx[0]]), "residual-bound", converged,
                    op.hvp_count - hvp0, time.perf_counter() - start, settings, payload=payload, vectors=vectors)


def spectral_norm(op, tol: float = 1e-6, max_iter: int | None = None, seed: int = 0, v0=None) -> Estimate:
    """||H||_2 = max(|lambda_max|, |lambda_min|) by Lanczos with which="magnitude" (H may be indefinite).

    value = |theta| of the largest-magnitude Ritz value (a certified lower bound on ||H||_2), error = its
    residual bound; payload: lanczos's, plus signed_eigenvalue and norm_lower_bound.
    """
    est = lanczos(op, k=1, which="magnitude", tol=tol, max_iter=max_iter, seed=seed, v0=v0)
    if est.status != "ok":
        return Estimate("spectral_norm", None, None, "residual-bound", False, est.hvp_count, est.wall_time_s,
                        est.settings, status=est.status)
    payload = {**est.payload, "signed_eigenvalue": est.value, "norm_lower_bound": abs(est.value)}
    return Estimate("spectral_norm", abs(est.value), est.error, "residual-bound", est.converged, est.hvp_count,
                    est.wall_time_s, {**est.settings, "method": "lanczos-magnitude"}, payload=payload)
