"""Power iteration with deflation: the simple baseline for the dominant (largest |lambda|) eigenvalues.

What it knows. Each iterate v is a unit vector, so rho = ||H v|| <= ||H||_2: the largest rho seen is a certified
lower bound on |lambda|_max = ||H||_2. The residual ||H v - theta v|| (theta = v^T H v) certifies only that SOME
eigenvalue lies within it of theta. The upper side is probabilistic: after k products from the Gaussian start q,
||H^k q|| = rho_0 ... rho_{k-1} >= |u.q| |lambda|_max^k for the dominant unit eigenvector u, and |u.q| >= c except
with probability `failure_probability` (hessian_tools.estimators.guarantees), so

    |lambda|_max <= (rho_0 ... rho_{k-1} / c)^(1/k).

That bound tightens only as c^(-1/k) (about 1.1 after 100 products): power iteration pins |lambda|_max from above
far more slowly than Lanczos, which is why it is only the baseline. The argument assumes exact products, so for
a float32 operator the interval is labelled an estimate.
"""

from __future__ import annotations

import math
import time

import torch

from hessian_tools.errors import UserError
from hessian_tools.estimators import _common as c
from hessian_tools.estimators.guarantees import start_floor
from hessian_tools.records import Estimate


def _deflate(op, v: torch.Tensor, found: list[torch.Tensor]) -> torch.Tensor:
    for _ in range(2 if found else 0):
        for u in found:
            v = v - c.dot(op, u, v) * u
    return v


def power_iteration(op, k: int = 1, tol: float = 1e-6, max_iter: int = 1000, seed: int = 0,
                    return_vectors: bool = False, failure_probability: float = 1e-3) -> Estimate:
    """The k largest-magnitude eigenvalues of symmetric `op`, one at a time, each deflated against the last.

    Each eigenvalue iterates v <- P H v / ||P H v||, P the projector off the vectors already found, until the
    deflated residual ||P H v - theta v|| <= tol * |theta| with theta = v^T H v (not on the change of theta),
    or max_iter HVPs for that eigenvalue; for the first eigenvalue P = I. Cost: one HVP per iteration;
    convergence is linear with ratio |lambda_{i+1} / lambda_i|.
    Returns an Estimate: value = theta of the dominant eigenvalue (signed); payload["interval"] = [lo, hi] for
    |lambda|_max (module docstring: lower side certified, upper failing with probability failure_probability),
    error = max(|value| - lo, hi - |value|), error_kind "probabilistic" ("estimate" for a float32 operator);
    converged when that error is within tol * |value| (rarely: see the module docstring). payload also holds
    eigenvalues (in the order found), residuals and residual_intervals (some eigenvalue within each; for later
    eigenvalues they carry the earlier vectors' errors too, which is why the stop uses the deflated residual),
    iterations, certified_side, failure_probability. return_vectors=True puts the (n, k) unit eigenvector estimates
    in `vectors` (this rank's rows for a sharded op, `_common`).
    """
    n = c.dimension(op)
    k = c.positive_int("k", k)
    if k > n:
        raise UserError(f"k={k} exceeds the operator dimension {n}: ask for at most {n} eigenvalues")
    tol = c.positive_float("tol", tol)
    max_iter = c.positive_int("max_iter", max_iter)
    delta = c.positive_float("failure_probability", failure_probability)
    if delta >= 1:
        raise UserError(f"failure_probability={failure_probability!r} must lie in (0, 1)")
    gen = c.generator(seed)
    settings = {"method": "power", "k": k, "which": "magnitude", "tol": tol, "max_iter": max_iter, "seed": seed,
                "failure_probability": delta, "operator": c.operator_settings(op)}
    start, hvp0 = time.perf_counter(), op.hvp_count
    values, residuals, iterations, found = [], [], [], []
    try:
        for _ in range(k):
            v = _deflate(op, c.gaussian(op, gen), found)
            if not found:
                floor = start_floor(delta, 1.0, c.norm(op, v))
                log_norms, largest = 0.0, 0.0
            v = v / c.norm(op, v)
            for it in range(1, max_iter + 1):
                w = c.matvec(op, v)
                theta = c.dot(op, v, w)
                res = c.norm(op, w - theta * v)
                if not found:
                    rho = c.norm(op, w)
                    log_norms, largest = log_norms + math.log(rho), max(largest, rho)
                w = _deflate(op, w, found)
                deflated_res = c.norm(op, w - theta * v)
                if deflated_res <= tol * abs(theta) or it == max_iter:
                    break
                v = w / c.norm(op, w)
            if not found:
                upper = math.exp((log_norms - math.log(floor)) / it)
            values.append(theta)
            residuals.append(res)
            iterations.append(it)
            found.append(v)
    except c.NonFiniteProduct as exc:
        return Estimate("lambda_absmax", None, None, "none", False, op.hvp_count - hvp0,
                        time.perf_counter() - start, settings, status=f"failed at eigenvalue {len(values) + 1}: {exc}")
    value = values[0]
    error = max(abs(value) - largest, upper - abs(value))
    kind = "probabilistic" if getattr(op, "dtype", torch.float64) == torch.float64 else "estimate"
    payload = {"interval": [largest, upper], "certified_side": "lower", "failure_probability": delta,
               "eigenvalues": values, "residuals": residuals,
               "residual_intervals": [[t - r, t + r] for t, r in zip(values, residuals)], "iterations": iterations}
    return Estimate("lambda_absmax", value, error, kind, error <= tol * abs(value), op.hvp_count - hvp0,
                    time.perf_counter() - start, settings, payload=payload,
                    vectors=torch.stack(found, dim=1) if return_vectors else None)
