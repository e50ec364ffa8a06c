"""Hutchinson and Hutch++ traces against dense traces: within their reported standard errors, and those standard
errors calibrated by their coverage of the known trace over many seeded trials."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from helpers import (SPECTRA, BatchHessianOperator, DenseOperator, dense_hessian, make_batches, make_mlp,
                     symmetric_with_spectrum)

from hessian_tools import UserError
from hessian_tools.estimators import hutchinson_trace, hutchpp_trace

MATRIX = symmetric_with_spectrum(SPECTRA["indefinite"], seed=4)
TRUE = float(np.trace(MATRIX))


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hutchinson_within_three_standard_errors(seed, distribution):
    op = DenseOperator(MATRIX)
    est = hutchinson_trace(op, n_samples=50, seed=seed, distribution=distribution, block_size=7)
    assert est.hvp_count == op.hvp_count == 50 == est.payload["n_samples"]
    assert est.error_kind == "standard-error" and est.converged
    assert abs(est.value - TRUE) <= 3 * est.error


COVERAGE_TRIALS = 300


def coverage_range(n_samples: int, trials: int = COVERAGE_TRIALS) -> tuple[float, float]:
    """The accepted share of trials whose +-1 SE interval covers the truth.

    Nominal level p0 = P(|t_{n-1}| <= 1) (the mean of n Gaussian samples over its estimated standard error is
    Student-t with n - 1 degrees of freedom; 0.674 at n = 30): the number of covering trials is
    Binomial(trials, p0), and the range is p0 +- 3 binomial standard deviations (a calibrated estimator falls
    outside it with probability ~0.3 %; a standard error off by 2x covers 38 % or 95 %, far outside).
    """
    p0 = 2 * stats.t.cdf(1.0, n_samples - 1) - 1
    half = 3 * math.sqrt(p0 * (1 - p0) / trials)
    return p0 - half, p0 + half


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_standard_error_covers_the_truth(distribution):
    """Over 300 seeds, [value - SE, value + SE] holds tr(A) as often as a 1-SE interval should."""
    low, high = coverage_range(30)
    hits = [abs(est.value - TRUE) <= est.error for est in
            (hutchinson_trace(DenseOperator(MATRIX), n_samples=30, seed=s, distribution=distribution)
             for s in range(COVERAGE_TRIALS))]
    assert low <= np.mean(hits) <= high, (np.mean(hits), low, high)


def test_hutchpp_standard_error_covers_the_truth():
    """Hutch++'s SE is that of its Hutchinson part alone. Given Q, tr(Q^T A Q) + tr((I-QQ^T) A (I-QQ^T)) = tr(A)
    exactly and the residual probes are independent of Q, so the estimate is unbiased given Q with the
    residual part's variance: the SE needs no term for the low-rank part, and its coverage is that of
    20 Hutchinson samples (60 products = 3 x 20)."""
    low, high = coverage_range(20)
    results = [hutchpp_trace(DenseOperator(MATRIX), n_matvecs=60, seed=s) for s in range(COVERAGE_TRIALS)]
    assert {e.payload["rank"] for e in results} == {20}
    hits = [abs(e.value - TRUE) <= e.error for e in results]
    assert low <= np.mean(hits) <= high, (np.mean(hits), low, high)


def test_standard_error_shrinks_with_samples():
    errors = [hutchinson_trace(DenseOperator(MATRIX), n_samples=n, seed=5).error for n in (25, 100, 400)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.7 * errors[0] / 2  # ~1/sqrt(n): 16 x the samples, 4 x smaller (slack for noise)


def test_stop_on_standard_error():
    op = DenseOperator(MATRIX)
    est = hutchinson_trace(op, n_samples=20, seed=0, target_std_error=1.0, max_samples=2000)
    assert est.converged and est.error <= 1.0 and est.hvp_count == op.hvp_count == est.payload["n_samples"]
    assert abs(est.value - TRUE) <= 3 * est.error
    capped = hutchinson_trace(DenseOperator(MATRIX), n_samples=20, target_std_error=1e-6, max_samples=30)
    assert not capped.converged and capped.payload["n_samples"] == 30


def test_hutchpp_within_three_standard_errors_and_exact_at_low_rank():
    op = DenseOperator(MATRIX)
    est = hutchpp_trace(op, n_matvecs=60, seed=0)
    assert est.hvp_count == op.hvp_count == 60
    assert abs(est.value - TRUE) <= 3 * est.error
    low_rank = symmetric_with_spectrum(np.concatenate([[5.0, -3.0, 2.0, 1.0], np.zeros(46)]), seed=1)
    exact = hutchpp_trace(DenseOperator(low_rank), n_matvecs=30, seed=0)
    assert exact.payload["rank"] == 10
    assert abs(exact.value - 5.0) <= 1e-10 and exact.error <= 1e-10


@pytest.mark.filterwarnings("ignore:Using backward:UserWarning")
def test_mlp_hessian_trace_and_pyhessian():
    """Ours and PyHessian's Hutchinson (it returns its samples) agree with the dense trace within error bars."""
    from pyhessian import hessian

    model, batches = make_mlp(), make_batches(1, batch_size=30)
    true = float(np.trace(dense_hessian(model, batches)))
    est = hutchinson_trace(BatchHessianOperator(model, batches), n_samples=60, seed=0)
    assert abs(est.value - true) <= 3 * est.error
    model32 = make_mlp(dtype=torch.float32)
    torch.manual_seed(0)
    samples = hessian(model32, torch.nn.CrossEntropyLoss(), data=(batches[0][0].float(), batches[0][1]),
                      cuda=False).trace(maxIter=60, tol=1e-4)
    theirs, their_se = np.mean(samples), np.std(samples, ddof=1) / np.sqrt(len(samples))
    assert abs(theirs - true) <= 3 * their_se
    assert abs(theirs - est.value) <= 3 * np.hypot(est.error, their_se)


@pytest.mark.parametrize("call, match", [
    (lambda op: hutchinson_trace(op, n_samples=1), "n_samples=1"),
    (lambda op: hutchinson_trace(op, distribution="uniform"), "distribution='uniform'"),
    (lambda op: hutchinson_trace(op, target_std_error=0.0), "target_std_error=0.0"),
    (lambda op: hutchpp_trace(op, n_matvecs=5), "n_matvecs=5"),
])
def test_bad_input_raises_user_error(call, match):
    with pytest.raises(UserError, match=match):
        call(DenseOperator(np.eye(3)))
