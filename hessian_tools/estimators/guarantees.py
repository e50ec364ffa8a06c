"""What a random start guarantees about the extreme eigenvalues, and the rounding of float32 products.

Start component. Let s = w + sigma g with g ~ N(0, I_n) independent of H and w (w = 0, sigma = 1 for a cold
start; w the normalised warm vector otherwise). For any fixed unit vector u, u.s ~ N(u.w, sigma^2), whose density
is at most 1 / (sigma sqrt(2 pi)), so P(|u.s| <= t) <= sqrt(2/pi) t / sigma whatever w is. Hence, with probability
at least 1 - delta, the normalised start q = s / ||s|| has

    |u.q| >= c(delta) = delta sigma sqrt(pi/2) / ||s||        (`start_floor`; ||s|| is the observed norm).

For a cold start this matches the exact law of u.q (Beta(1/2, (n-1)/2) for its square) to first order in delta.

Upper bound from the Lanczos polynomial. With T_m the m x m Lanczos matrix of H from q (exact arithmetic), the
next basis vector is q_{m+1} = pi(H) q / (beta_1 ... beta_m), pi(x) = prod_j (x - theta_j) over the Ritz values.
Taking norms, sum_i (u_i.q)^2 pi(lambda_i)^2 = (beta_1 ... beta_m)^2, so for the top eigenpair (lambda_1, u_1)

    |u_1.q| pi(lambda_1) <= beta_1 ... beta_m.

lambda_1 >= theta_1 (interlacing) and pi increases on [theta_1, inf), so on the event |u_1.q| >= c:

    lambda_1 <= x*,   x* >= theta_1 the root of  sum_j log(x* - theta_j) = sum_j log beta_j - log c.   (`polynomial_bound`)

Linearised, x* - theta_1 ~ r_1 |s_11| / c (r_1 the top residual, s_11 the first entry of its eigenvector of T_m):
about 2.4 / delta times the residual for a cold start. The bound needs no gap and no spread: an eigenvalue hidden
above theta_1 (a cluster not yet resolved, a warm start blind to it) widens it, with probability 1 - delta.
The bottom end is the same bound for -H.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.optimize
import torch

from hessian_tools.estimators import _common as c

LOG_LIMIT = 700.0  # |log(x* - theta_1)| searched up to this (exp stays finite)
ROUNDING_SAFETY = 4.0  # the relative rounding measured at the first Lanczos vector x this; the largest ratio seen
# between the rounding at any of 20 Lanczos vectors and at the first was 3.25 (benchmarks/lanczos_guarantees.py)


def start_floor(delta: float, sigma: float, start_norm: float) -> float:
    """c with P(|u.s| / ||s|| < c) <= delta for any fixed unit u, s = w + sigma g (module docstring)."""
    return delta * sigma * math.sqrt(math.pi / 2) / start_norm


def polynomial_bound(theta: np.ndarray, log_beta_product: float, floor: float) -> float:
    """x* - theta.max() >= 0 for Ritz values `theta` of one Lanczos block, sum log beta_j and the start floor c."""
    if not math.isfinite(log_beta_product):  # beta_m = 0: the block spans an invariant subspace
        return 0.0
    gaps = float(np.max(theta)) - np.sort(theta)[:-1]  # theta_1 - theta_j >= 0, j >= 2
    target = log_beta_product - math.log(floor)

    def excess(y):  # increasing in y = log(x* - theta_1)
        return y + float(np.sum(np.log(gaps + math.exp(y)))) - target

    hi = 0.0
    while excess(hi) < 0:
        if hi >= LOG_LIMIT:  # x* - theta_1 > e^700: no bound worth the name
            return math.inf
        hi = min(2 * hi + 1, LOG_LIMIT)
    lo = hi - 1.0
    while excess(lo) > 0:
        if lo <= -LOG_LIMIT:  # x* - theta_1 < e^-700: below anything float64 resolves next to theta_1
            return 0.0
        lo = max(lo - 2 * abs(lo) - 1, -LOG_LIMIT)
    return math.exp(scipy.optimize.brentq(excess, lo, hi, xtol=1e-10))


def measured_rounding(op, v: torch.Tensor, product: torch.Tensor, product_error: float) -> tuple[float | None, int]:
    """(rounding, float64 products spent): rounding = ROUNDING_SAFETY x (||H32 v - H64 v|| + product_error) /
    ||H64 v||, for the float32 operator `op`, a vector v, `product` within product_error of op's product H32 v (the
    first Lanczos vector and its product rebuilt from the basis, so no product is spent on it) and H64 from
    op.with_dtype(float64); 0 for a float64 operator, None for a float32 one without that twin. Costs one product
    of the twin."""
    if getattr(op, "dtype", torch.float64) == torch.float64:
        return 0.0, 0
    if not hasattr(op, "with_dtype"):
        return None, 0
    exact = c.matvec(op.with_dtype(torch.float64), v)
    error, size = c.norm(op, product - exact) + product_error, c.norm(op, exact)
    if size > 0:
        return ROUNDING_SAFETY * error / size, 1
    return (math.inf if error > 0 else 0.0), 1  # H v = 0 in float64 but not in float32: the rounding is unbounded
