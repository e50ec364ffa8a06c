"""Data error bars calibrated on a synthetic population with a known answer.

The population imitates a loss Hessian: each batch's matrix is a mean of per-sample PSD outer products
(x x^T with x ~ N(0, C)) plus a fixed indefinite part D and zero-mean indefinite per-sample terms, so
E[H_batch] = C + D has a known spectrum, and lambda_max of a mean of few batches is biased upward
(lambda_max is convex in the matrix).
"""

import numpy as np
from helpers import DenseOperator

from hessian_tools.estimators import data_spread, lanczos

N_TRIALS, N_BATCHES = 200, 8


class Population:
    """Per-batch matrices H_b = D + (1/m) sum_i (x_i x_i^T + sigma (a_i b_i^T + b_i a_i^T) / 2), n x n."""

    def __init__(self, n=24, samples_per_batch=8, sigma=1.0, seed=0):
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        self.factor = q * np.sqrt(np.concatenate([[6.0], np.linspace(2.0, 0.1, n - 1)]))  # C = F F^T
        q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        self.fixed = (q * np.linspace(-2.0, 0.5, n)) @ q.T
        self.n, self.m, self.sigma = n, samples_per_batch, sigma
        self.mean = self.fixed + self.factor @ self.factor.T
        self.eigenvalues = np.linalg.eigvalsh(self.mean)

    def batches(self, rng, count):
        out = []
        for _ in range(count):
            x = rng.standard_normal((self.m, self.n)) @ self.factor.T
            a, b = rng.standard_normal((2, self.m, self.n))
            out.append(self.fixed + (x.T @ x + self.sigma * (a.T @ b + b.T @ a) / 2) / self.m)
        return out


POPULATION = Population()


def mean_operator(batches):
    return DenseOperator(np.mean(batches, axis=0))


def solve(op):
    return lanczos(op, k=1, tol=1e-10)


def test_68_percent_intervals_cover_60_to_76_percent_of_200_trials():
    """The error bar the sweep reports: union estimate +- std / sqrt(2) over 2 disjoint halves."""
    rng, truth, hits = np.random.default_rng(1), POPULATION.eigenvalues[-1], 0
    for _ in range(N_TRIALS):
        batches = POPULATION.batches(rng, N_BATCHES)
        union = solve(mean_operator(batches)).value
        spread = data_spread(mean_operator, batches, solve, n_groups=2)
        hits += abs(union - truth) <= spread.payload["std_error_of_mean"]
    assert 0.60 <= hits / N_TRIALS <= 0.76, f"coverage {hits / N_TRIALS:.3f}"
