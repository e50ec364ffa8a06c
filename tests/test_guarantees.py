"""The two ingredients of the probabilistic bound: the start's guaranteed component and the polynomial root."""

import math

import numpy as np
import pytest

from hessian_tools.estimators.guarantees import polynomial_bound, start_floor


@pytest.mark.parametrize("warm", [False, True])
def test_start_floor_fails_with_at_most_the_promised_probability(warm):
    """|u.s| / ||s|| < c(delta) in at most a fraction delta of starts, for a warm vector orthogonal to u too; and
    the floor is not loose: for a cold start it fails in about delta (P(|Z| < delta sqrt(pi/2)) ~ delta)."""
    rng = np.random.default_rng(0)
    n, draws, delta = 40, 40000, 0.05
    u = np.zeros(n)
    u[0] = 1.0
    sigma = 1.0 / math.sqrt(n) if warm else 1.0
    w = np.zeros(n)
    if warm:
        w[1] = 1.0  # the worst warm vector: orthogonal to u
    s = w + sigma * rng.standard_normal((draws, n))
    norms = np.linalg.norm(s, axis=1)
    floors = np.array([start_floor(delta, sigma, norm) for norm in norms])
    failed = np.mean(np.abs(s @ u) / norms < floors)
    assert failed <= delta + 3 * math.sqrt(delta / draws)
    assert failed >= 0.8 * delta


def test_polynomial_bound_closed_forms():
    """One Ritz value a: x* - a = beta / c. Two equal Ritz values: (x* - a)^2 = beta_1 beta_2 / c."""
    assert polynomial_bound(np.array([3.0]), math.log(2e-6), 1e-3) == pytest.approx(2e-3, rel=1e-9)
    assert polynomial_bound(np.array([2.0, 2.0]), math.log(1e-6), 1.0) == pytest.approx(1e-3, rel=1e-9)
    assert polynomial_bound(np.array([0.0, 1.0]), -math.inf, 1e-3) == 0.0  # invariant block: exact
    theta = np.array([-1.0, 0.2, 0.9])
    delta = polynomial_bound(theta, math.log(1e-4), 1e-2)
    assert math.prod(theta.max() + delta - theta) == pytest.approx(1e-2, rel=1e-8)  # the root of the module docstring


def test_polynomial_bound_with_large_beta_products():
    """100 Ritz values spread over [-1000, 1000]: log(beta_1 ... beta_m) ~ 670, near where exp overflows."""
    theta = np.linspace(-1000.0, 1000.0, 100)
    log_beta = 100 * math.log(800.0)
    delta = polynomial_bound(theta, log_beta, 1e-6)
    assert np.sum(np.log(theta.max() + delta - theta[:-1])) + math.log(delta) == pytest.approx(
        log_beta - math.log(1e-6), rel=1e-9)
