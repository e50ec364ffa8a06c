"""Power iteration with deflation: the simple baseline for the dominant (largest |lambda|) eigenvalues."""

from __future__ import annotations

import time

import torch

from hessian_tools.errors import UserError
from hessian_tools.estimators import _common as c
from hessian_tools.records import Estimate


def _deflate(v: torch.Tensor, found: list[torch.Tensor]) -> torch.Tensor:
    for _ in range(2 if found else 0):
        for u in found:
            v = v - (u @ v) * u
    return v


def power_iteration(op, k: int = 1, tol: float = 1e-6, max_iter: int = 1000, seed: int = 0,
                    return_vectors: bool = False) -> Estimate:
    """The k largest-magnitude eigenvalues of symmetric `op`, one at a time, each deflated against the last.

    Each eigenvalue iterates v <- P H v / ||P H v||, P the projector off the vectors already found, until the
    deflated residual ||P H v - theta v|| <= tol * |theta| with theta = v^T H v (not on the change of
    theta), or max_iter HVPs for that eigenvalue; for the first eigenvalue P = I. The reported error is the
    full residual ||H v - theta v||, certified (an eigenvalue of H lies within it); for later eigenvalues it
    also carries the error of the earlier vectors, which is why the stopping test uses the deflated one.
    Cost: one HVP per iteration; convergence is linear with ratio |lambda_{i+1} / lambda_i|.
    Returns an Estimate: value = the dominant eigenvalue (signed), error = its residual bound; payload:
    eigenvalues (in the order found), residuals, bounds, iterations.
    """
    n = c.dimension(op)
    k = c.positive_int("k", k)
    if k > n:
        raise UserError(f"k={k} exceeds the operator dimension {n}: ask for at most {n} eigenvalues")
    tol = c.positive_float("tol", tol)
    max_iter = c.positive_int("max_iter", max_iter)
    gen, device = c.generator(seed), c.device_of(op)
    settings = {"method": "power", "k": k, "which": "magnitude", "tol": tol, "max_iter": max_iter, "seed": seed,
                "operator": c.operator_settings(op)}
    start, hvp0 = time.perf_counter(), op.hvp_count
    values, residuals, iterations, found = [], [], [], []
    converged = True
    try:
        for _ in range(k):
            v = _deflate(torch.randn(n, generator=gen, dtype=c.FLOAT).to(device), found)
            v = v / torch.linalg.vector_norm(v)
            for it in range(1, max_iter + 1):
                w = c.matvec(op, v)
                theta = float(v @ w)
                res = float(torch.linalg.vector_norm(w - theta * v))
                w = _deflate(w, found)
                deflated_res = float(torch.linalg.vector_norm(w - theta * v))
                if deflated_res <= tol * abs(theta) or it == max_iter:
                    break
                v = w / torch.linalg.vector_norm(w)
            converged &= deflated_res <= tol * abs(theta)
            values.append(theta)
            residuals.append(res)
            iterations.append(it)
            found.append(v)
    except c.NonFiniteProduct as exc:
        return Estimate("lambda_absmax", None, None, "residual-bound", False, op.hvp_count - hvp0,
                        time.perf_counter() - start, settings, status=f"failed at eigenvalue {len(values) + 1}: {exc}")
    payload = {"eigenvalues": values, "residuals": residuals,
               "bounds": [[t - r, t + r] for t, r in zip(values, residuals)], "iterations": iterations}
    return Estimate("lambda_absmax", values[0], residuals[0], "residual-bound", converged, op.hvp_count - hvp0,
                    time.perf_counter() - start, settings, payload=payload,
                    vectors=torch.stack(found, dim=1) if return_vectors else None)
