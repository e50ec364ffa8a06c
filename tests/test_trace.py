"""Hutchinson and Hutch++ traces against dense traces, within their reported standard errors."""

import numpy as np
import pytest
import torch
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
    assert np.isclose(est.error, np.std(est.payload["samples"], ddof=1) / np.sqrt(50))


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
