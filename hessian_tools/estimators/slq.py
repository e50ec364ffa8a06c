"""Spectral density by stochastic Lanczos quadrature (SLQ).

For each probe z (Rademacher, normalised to q = z / sqrt(n)), m Lanczos steps with full reorthogonalisation
give T_m = S diag(theta) S^T; the Gauss quadrature nodes theta_j with weights tau_j = S_1j^2 (sum 1) give
q^T f(H) q ~ sum_j tau_j f(theta_j), and E_z[q^T f(H) q] = tr f(H) / n. The density on a fixed grid is
the probe average of sum_j tau_j N(x; theta_j, width^2): it integrates to 1 over the real line, and over
the grid up to the mass outside it (reported exactly as `mass_on_grid`). A fixed grid and width make
densities comparable across models. Moment p: mean over probes of sum_j tau_j theta_j^p (exact for
p <= 2m - 1); moment 1 = mean of z^T H z / n, i.e. Hutchinson's trace / n.
"""

from __future__ import annotations

import math
import time

import numpy as np
import scipy.special

from hessian_tools.errors import UserError
from hessian_tools.estimators import _common as c
from hessian_tools.estimators.krylov import KrylovBasis
from hessian_tools.records import Estimate

MOMENTS = 3  # moments 0, 1, 2 are reported with their standard errors


def _check_grid(grid) -> tuple[float, float, int] | None:
    if grid is None:
        return None
    if len(grid) != 3 or not grid[1] > grid[0] or int(grid[2]) < 2:
        raise UserError(f"grid={grid!r} must be (lo, hi, n_points) with lo < hi and n_points >= 2")
    return float(grid[0]), float(grid[1]), int(grid[2])


def _auto_grid(nodes: np.ndarray, width: float | None) -> tuple[float, float, int]:
    """The Ritz range padded by 5 % (and by 4 widths), 1001 points."""
    lo, hi = float(nodes.min()), float(nodes.max())
    pad = 0.05 * (hi - lo) if hi > lo else max(abs(hi), 1.0)
    pad = max(pad, 4 * width) if width else pad
    return lo - pad, hi + pad, 1001


def slq_density(op, n_probes: int = 10, n_iter: int = 80, grid=None, width: float | None = None,
                seed: int = 0) -> Estimate:
    """Stochastic Lanczos quadrature: spectral density on a grid, Ritz nodes and weights, moments.

    n_probes Rademacher probes, n_iter Lanczos steps each (capped at n; a probe stops early in an
    invariant subspace, where its quadrature is exact). Cost: at most n_probes * n_iter HVPs.
    grid: (lo, hi, n_points), or None for the Ritz range padded by 5 % (and 4 widths) with 1001 points.
    width: Gaussian standard deviation, default 1 % of the grid range.
    Returns an Estimate: value = mean eigenvalue tr(H)/n (moment 1), error = its standard error over
    probes; payload: grid, density, mass_on_grid, width, nodes / weights (one list per probe), moments and
    moment_std_errors (p = 0, 1, 2), n.
    """
    n = c.dimension(op)
    n_probes = c.positive_int("n_probes", n_probes, low=2)
    n_iter = min(c.positive_int("n_iter", n_iter), n)
    grid = _check_grid(grid)
    if width is not None:
        width = c.positive_float("width", width)
    gen = c.generator(seed)
    settings = {"method": "slq", "n_probes": n_probes, "n_iter": n_iter, "grid": list(grid) if grid else None,
                "width": width, "seed": seed, "distribution": "rademacher", "operator": c.operator_settings(op)}
    start, hvp0 = time.perf_counter(), op.hvp_count
    nodes, weights = [], []
    try:
        for _ in range(n_probes):
            basis = KrylovBasis(op, c.probes(op, gen, 1, "rademacher")[:, 0], n_iter)
            while basis.m < n_iter and not basis.exhausted:
                basis.step()
            theta, S, _ = basis.ritz()
            nodes.append(theta)
            weights.append(S[0, :] ** 2)
    except c.NonFiniteProduct as exc:
        return Estimate("spectral_density", None, None, "standard-error", False, op.hvp_count - hvp0,
                        time.perf_counter() - start, settings, status=f"failed at probe {len(nodes) + 1}: {exc}")
    lo, hi, n_points = grid or _auto_grid(np.concatenate(nodes), width)
    width = width if width is not None else 0.01 * (hi - lo)
    x = np.linspace(lo, hi, n_points)
    density = np.zeros(n_points)
    mass = 0.0
    for theta, tau in zip(nodes, weights):
        density += (tau * np.exp(-0.5 * ((x[:, None] - theta) / width) ** 2)).sum(axis=1)
        cdf = scipy.special.ndtr((hi - theta) / width) - scipy.special.ndtr((lo - theta) / width)
        mass += float(tau @ cdf)
    density /= n_probes * width * math.sqrt(2 * math.pi)
    per_probe = np.array([[float(tau @ theta**p) for p in range(MOMENTS)] for theta, tau in zip(nodes, weights)])
    moments = per_probe.mean(axis=0)
    std_errors = per_probe.std(axis=0, ddof=1) / math.sqrt(n_probes)
    payload = {"grid": x.tolist(), "density": density.tolist(), "mass_on_grid": mass / n_probes, "width": width,
               "nodes": [t.tolist() for t in nodes], "weights": [w.tolist() for w in weights],
               "moments": moments.tolist(), "moment_std_errors": std_errors.tolist(), "n": n}
    return Estimate("spectral_density", float(moments[1]), float(std_errors[1]), "standard-error", True,
                    op.hvp_count - hvp0, time.perf_counter() - start,
                    {**settings, "grid": [lo, hi, n_points], "width": width}, payload=payload)
