"""The Lanczos basis stored in float32 (memory for 100M-parameter models) and sized by a byte budget: the
arithmetic stays float64, the storage rounding enters the intervals, and they still hold lambda_max."""

import numpy as np
import pytest
import torch
from helpers import SPECTRA, DenseOperator, symmetric_with_spectrum
from operator_refs import tiny_gpt, token_batches

from hessian_tools import UserError
from hessian_tools.estimators import krylov, lanczos
from hessian_tools.operators import ParamHessian

EPS32 = float(torch.finfo(torch.float32).eps)


def covers(est, value):
    lo, hi = est.payload["interval"]
    return lo <= value <= hi


@pytest.mark.parametrize("spectrum", ["indefinite", "clustered", "degenerate_top"])
def test_float32_basis_interval_holds_and_stops_at_its_floor(spectrum):
    matrix = symmetric_with_spectrum(SPECTRA[spectrum], seed=4)
    top = float(np.linalg.eigvalsh(matrix).max())
    exact = lanczos(DenseOperator(matrix), tol=1e-10)
    est = lanczos(DenseOperator(matrix), tol=1e-10, basis_dtype=torch.float32)
    assert covers(est, top) and covers(exact, top)
    assert est.settings["basis_dtype"] == "float32" and exact.settings["basis_dtype"] == "float64"
    assert abs(est.value - top) <= 1e-5 * abs(top)  # float32 storage: about m eps32 ||T||, not eps64
    assert est.converged and est.payload["limited_by_rounding"]  # tol 1e-10 is below the float32 floor
    assert est.error > exact.error  # the storage's rounding and floor widen the interval


def test_float32_basis_coverage_when_stopped_early():
    """Stopped after 10 steps, the float32-stored basis's interval holds lambda_max in all 60 trials (probability
    of a miss 1e-3 each) on a small-gap spectrum, like the float64 basis's."""
    eigs = np.concatenate([[1.0], 0.99 - np.geomspace(1e-3, 1.0, 79)])
    held = [covers(lanczos(DenseOperator(symmetric_with_spectrum(eigs, seed=t)), tol=1e-12, max_iter=10, seed=t,
                           basis_dtype=torch.float32), 1.0) for t in range(60)]
    assert all(held)


def test_storage_rounding_enters_the_column_errors():
    """With a float64 operator, the float64 basis's column errors are rounding-level, the float32 basis's carry
    beta_j ||q_stored - q|| (about eps32 beta)."""
    matrix = symmetric_with_spectrum(SPECTRA["indefinite"], seed=1)
    v0 = torch.randn(matrix.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = {}
    for dtype in (torch.float64, torch.float32):
        basis = krylov.KrylovBasis(DenseOperator(matrix), v0, 8, storage=dtype)
        for _ in range(8):
            basis.step()
        errors[dtype] = np.asarray(basis.column_errors)
        assert basis.floor(np.array([2.0])) == 10 * 8 * float(torch.finfo(dtype).eps) * 2.0  # the storage's eps
    assert errors[torch.float64].max() < 1e-12
    assert (errors[torch.float32][:-1] > 0.05 * EPS32).all() and errors[torch.float32].max() < 100 * EPS32 * 10


def test_small_blocks_and_chunks_give_the_same_answer(monkeypatch):
    """Rows per block from BLOCK_BYTES (1 row here) and the chunked float64 casts (CHUNK 7) change only the order
    of summation."""
    matrix = symmetric_with_spectrum(SPECTRA["indefinite"], seed=2)
    ref32 = lanczos(DenseOperator(matrix), k=2, which="both", tol=1e-8, basis_dtype=torch.float32, return_vectors=True)
    ref64 = lanczos(DenseOperator(matrix), k=2, which="both", tol=1e-10)
    monkeypatch.setattr(krylov, "BLOCK_BYTES", 8 * matrix.shape[0])
    monkeypatch.setattr(krylov, "CHUNK", 7)
    small32 = lanczos(DenseOperator(matrix), k=2, which="both", tol=1e-8, basis_dtype=torch.float32,
                      return_vectors=True)
    small64 = lanczos(DenseOperator(matrix), k=2, which="both", tol=1e-10)
    basis = krylov.KrylovBasis(DenseOperator(matrix), torch.ones(matrix.shape[0], dtype=torch.float64), 5,
                               storage=torch.float32)
    assert basis.rows == 2 and basis.blocks[0].shape == (2, matrix.shape[0])  # 8 n bytes = two float32 rows
    np.testing.assert_allclose(small32.payload["eigenvalues"], ref32.payload["eigenvalues"], rtol=1e-12)
    np.testing.assert_allclose(small64.payload["eigenvalues"], ref64.payload["eigenvalues"], rtol=1e-13)
    assert small32.payload["steps"] == ref32.payload["steps"]
    np.testing.assert_allclose(small32.vectors.abs(), ref32.vectors.abs(), atol=1e-10)


def test_basis_budget_caps_the_steps_and_says_so():
    matrix = symmetric_with_spectrum(np.concatenate([[1.0], 0.99 - np.geomspace(1e-3, 1.0, 79)]), seed=0)
    n = matrix.shape[0]
    est = lanczos(DenseOperator(matrix), tol=1e-14, basis_budget=4 * n * 9, basis_dtype=torch.float32)
    assert est.settings["max_iter"] == 8 and est.settings["max_iter_limited_by"] == "basis_budget"
    assert est.payload["steps"] == 8 and not est.converged and covers(est, 1.0)
    wide = lanczos(DenseOperator(matrix), tol=1e-14, basis_budget=8 * n * 1000)
    assert wide.settings["max_iter_limited_by"] is None
    with pytest.raises(UserError, match="basis_budget"):
        lanczos(DenseOperator(matrix), k=3, basis_budget=8 * n * 3)
    with pytest.raises(UserError, match="basis_dtype"):
        lanczos(DenseOperator(matrix), basis_dtype=torch.float16)


def test_float32_basis_on_a_float32_model_operator_holds_the_float64_answer():
    model, batches = tiny_gpt("simplegpt"), token_batches((2, 1))
    exact = lanczos(ParamHessian(model, batches, dtype=torch.float64), tol=1e-10)
    est = lanczos(ParamHessian(model, batches, dtype=torch.float32), tol=1e-6, basis_dtype=torch.float32)
    assert covers(est, exact.value) and est.error_kind == "measured" and est.converged
    assert est.error <= 1e-4 * abs(est.value)
