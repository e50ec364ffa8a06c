"""Deflated power iteration against dense eigenvalues and against Lanczos; what its interval promises."""

import numpy as np
import pytest
from helpers import SPECTRA, DenseOperator, symmetric_with_spectrum

from hessian_tools import UserError
from hessian_tools.estimators import lanczos, power_iteration

# Dominant eigenvalues 10, -8, 5 with magnitude ratios <= 0.8: power iteration converges in a few dozen steps.
EIGS = np.concatenate([[10.0, -8.0, 5.0], np.linspace(-2.0, 2.0, 37)])


def test_dominant_eigenvalues_with_deflation():
    op = DenseOperator(symmetric_with_spectrum(EIGS, seed=7))
    est = power_iteration(op, k=3, tol=1e-9, max_iter=2000, return_vectors=True)
    assert est.quantity == "lambda_absmax" and est.error_kind == "probabilistic"
    np.testing.assert_allclose(est.payload["eigenvalues"], [10.0, -8.0, 5.0], rtol=1e-8)
    lo, hi = est.payload["interval"]
    assert 10.0 - 1e-8 <= lo <= 10.0 <= hi and abs(est.value - 10.0) <= est.error
    # the iteration converged (residual 1e-9), the guarantee did not: the upper side shrinks only as c^(-1/k)
    assert not est.converged and 1e-9 * 10.0 < est.error < 0.2 * 10.0
    assert est.hvp_count == op.hvp_count == sum(est.payload["iterations"])
    Y = est.vectors.numpy()
    np.testing.assert_allclose(Y.T @ Y, np.eye(3), atol=1e-8)


def test_agrees_with_lanczos_and_costs_more():
    matrix = symmetric_with_spectrum(EIGS, seed=8)
    power = power_iteration(DenseOperator(matrix), k=1, tol=1e-8, max_iter=2000)
    krylov = lanczos(DenseOperator(matrix), k=1, which="magnitude", tol=1e-8)
    assert abs(power.value - krylov.value) <= power.error + krylov.error
    assert krylov.hvp_count < power.hvp_count


def test_stops_on_residual_and_bound_holds():
    matrix = symmetric_with_spectrum(SPECTRA["indefinite"], seed=9)
    true = np.linalg.eigvalsh(matrix)
    for max_iter in (3, 10, 30):
        est = power_iteration(DenseOperator(matrix), k=1, tol=1e-12, max_iter=max_iter)
        assert not est.converged and est.hvp_count == max_iter
        assert np.abs(true - est.value).min() <= est.payload["residuals"][0]  # residual bound: some eigenvalue
        lo, hi = est.payload["interval"]
        assert lo <= np.abs(true).max() <= hi  # the interval: |lambda|_max itself
    est = power_iteration(DenseOperator(matrix), k=1, tol=1e-3, max_iter=5000)
    assert est.payload["residuals"][0] <= 1e-3 * abs(est.value) and est.hvp_count < 5000  # stopped on the residual


@pytest.mark.parametrize("kwargs, match", [({"k": 4}, "exceeds the operator dimension 3"),
                                           ({"tol": -1.0}, "tol=-1.0"), ({"max_iter": 0}, "max_iter=0")])
def test_bad_input_raises_user_error(kwargs, match):
    with pytest.raises(UserError, match=match):
        power_iteration(DenseOperator(np.eye(3)), **kwargs)
