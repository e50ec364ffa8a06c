"""Lanczos and spectral_norm against dense float64 references (numpy eigvalsh, scipy eigsh, PyHessian)."""

import json

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from helpers import (SPECTRA, BatchHessianOperator, DenseOperator, dense_hessian, make_batches, make_mlp,
                     symmetric_with_spectrum)

from hessian_tools import UserError
from hessian_tools.estimators import lanczos, spectral_norm

RTOL = 1e-8  # the accuracy the issue asks of top and bottom eigenvalues, relative to ||H||


def expected(eigs, k, which):
    desc = np.sort(eigs)[::-1]
    if which == "largest":
        return desc[:k]
    if which == "smallest":
        return desc[::-1][:k]
    if which == "magnitude":
        return np.array(sorted(eigs, key=lambda x: -abs(x))[:k])
    return np.concatenate([desc[:k], desc[::-1][:k]])


@pytest.mark.parametrize("which", ["largest", "smallest", "both", "magnitude"])
@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
def test_extreme_eigenvalues_match_eigvalsh(spectrum, which):
    matrix = symmetric_with_spectrum(SPECTRA[spectrum], seed=3)
    true = np.linalg.eigvalsh(matrix)
    k = 1 if spectrum in ("degenerate_top", "tiny") else 2
    op = DenseOperator(matrix)
    est = lanczos(op, k=k, which=which, tol=1e-10)
    want = expected(true, k, which)
    got = np.array(est.payload["eigenvalues"])
    assert est.converged and est.status == "ok"
    np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * np.abs(true).max())
    truth = abs(want[0]) if which == "magnitude" else want[0]
    lo, hi = est.payload["interval"]
    assert est.value == got[0] and lo <= truth <= hi and abs(abs(est.value) - truth if which == "magnitude"
                                                              else est.value - truth) <= est.error
    assert est.error_kind == ("certified" if spectrum == "tiny" else "probabilistic")  # tiny: the basis spans R^3
    for (lo_i, hi_i), t in zip(est.payload["intervals"], want):
        assert lo_i <= (abs(t) if which == "magnitude" else t) <= hi_i
    assert est.hvp_count == op.hvp_count == est.payload["steps"]


@pytest.mark.parametrize("spectrum", ["indefinite", "clustered"])
def test_bounds_contain_the_true_error(spectrum):
    """A loose tolerance leaves visible errors: the residual bound covers the nearest eigenvalue, the intervals
    cover lambda_max and lambda_min, and on these well-separated ends the Kato-Temple estimate happens to hold too
    (inside a cluster it does not: test_eigen_guarantees)."""
    matrix = symmetric_with_spectrum(SPECTRA[spectrum], seed=5)
    true = np.linalg.eigvalsh(matrix)
    kato_checked = 0
    for max_iter in (4, 6, 8):
        est = lanczos(DenseOperator(matrix), k=2, which="both", tol=1e-12, max_iter=max_iter)
        assert not est.converged
        theta, res = np.array(est.payload["eigenvalues"]), np.array(est.payload["residuals"])
        nearest = np.abs(true[:, None] - theta[None, :]).min(axis=0)
        assert np.all(nearest <= res)  # Weyl / Bauer-Fike: certified
        errors = np.abs(theta - expected(true, 2, "both"))
        assert errors.max() > 1e-8  # the check is not vacuous
        (top_lo, top_hi), _, (bottom_lo, bottom_hi), _ = est.payload["intervals"]
        assert top_lo <= true[-1] <= top_hi and bottom_lo <= true[0] <= bottom_hi
        kato = est.payload["kato_temple"]
        assert kato["kind"] == "estimate"
        for i in (0, 2):  # lambda_max and lambda_min
            assert kato["values"][i] is None or errors[i] <= kato["values"][i]
        kato_checked += sum(kato["values"][i] is not None for i in (0, 2))
        ritz = est.payload["ritz_values"]
        assert ritz[-1] <= true[-1] + 1e-12 and ritz[0] >= true[0] - 1e-12  # interlacing
        assert ritz[-1] - 1e-12 <= est.payload["lambda_max_lower_bound"] <= ritz[-1] <= true[-1] + 1e-12
        assert true[0] - 1e-12 <= ritz[0] <= est.payload["lambda_min_upper_bound"] <= ritz[0] + 1e-12
    assert kato_checked >= 2


def test_residuals_are_the_true_residuals_of_the_ritz_vectors():
    matrix = symmetric_with_spectrum(SPECTRA["indefinite"], seed=2)
    est = lanczos(DenseOperator(matrix), k=3, which="largest", tol=1e-8, return_vectors=True)
    Y = est.vectors.numpy()
    assert Y.shape == (62, 3) and est.payload["steps"] > 16  # the basis spans more than one storage block
    np.testing.assert_allclose(Y.T @ Y, np.eye(3), atol=1e-12)
    actual = np.linalg.norm(matrix @ Y - Y * np.array(est.payload["eigenvalues"]), axis=0)
    assert np.all(actual <= np.array(est.payload["residuals"]) * (1 + 1e-6))
    assert np.all(np.array(est.payload["residuals"]) <= 1e-8 * np.abs(est.payload["eigenvalues"]))


def test_agrees_with_scipy_eigsh():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 300))
    matrix = (a + a.T) / 2
    ref = scipy.sparse.linalg.eigsh(matrix, k=3, which="LA", tol=1e-12)[0][::-1]
    est = lanczos(DenseOperator(matrix), k=3, which="largest", tol=1e-10, max_iter=300)
    np.testing.assert_allclose(est.payload["eigenvalues"], ref, rtol=1e-9)


def test_warm_start_speeds_up_the_estimate_not_the_guarantee():
    """On a nearby operator a warm start's estimate is far better at the same budget; the upper bound rests on the
    Gaussian part of the start alone, so reaching tol costs what a cold start costs (within 2 HVPs)."""
    matrix = symmetric_with_spectrum(SPECTRA["clustered"], seed=1)
    rng = np.random.default_rng(0)
    bump = rng.standard_normal(matrix.shape)
    nearby = matrix + 1e-3 * (bump + bump.T)
    lam = np.linalg.eigvalsh(nearby)[-1]
    previous = lanczos(DenseOperator(matrix), tol=1e-8, return_vectors=True).vectors[:, 0]
    early_cold = lanczos(DenseOperator(nearby), max_iter=4)
    early_warm = lanczos(DenseOperator(nearby), max_iter=4, v0=previous)
    assert abs(early_warm.value - lam) < 0.1 * abs(early_cold.value - lam)  # measured: 3e-2
    cold = lanczos(DenseOperator(nearby), tol=1e-8)
    warm = lanczos(DenseOperator(nearby), tol=1e-8, v0=previous)
    assert warm.converged and cold.converged and warm.hvp_count <= cold.hvp_count + 2
    assert warm.settings["warm_start"] and abs(warm.value - lam) <= warm.error


def test_degenerate_top_and_invariant_subspace():
    """Three distinct eigenvalues in R^43: each start's Krylov space is invariant after 3 steps and holds one copy
    of lambda_max = 5. k=1: the bound on that invariant block already pins lambda_max (3 HVPs). k=3: the restarts
    in the complement find the other two copies (the interval of each then closes on 5)."""
    matrix = symmetric_with_spectrum(np.concatenate([[5.0, 5.0, 5.0], np.ones(20), -np.ones(20)]), seed=4)
    one = lanczos(DenseOperator(matrix), k=1, tol=1e-10)
    assert one.payload["breakdowns"] == 1 and one.converged and one.error_kind == "probabilistic"
    assert one.hvp_count == 3 and one.payload["interval"][0] <= 5.0 <= one.payload["interval"][1] <= 5.0 + 1e-12
    three = lanczos(DenseOperator(matrix), k=3, tol=1e-10)
    assert three.payload["breakdowns"] >= 3 and three.converged
    np.testing.assert_allclose(three.payload["eigenvalues"], [5.0, 5.0, 5.0], atol=RTOL * 5)
    for lo, hi in three.payload["intervals"]:
        assert lo <= 5.0 <= hi


def test_full_space_is_exact():
    eigs = SPECTRA["tiny"]
    est = lanczos(DenseOperator(symmetric_with_spectrum(eigs)), k=3, which="largest", tol=1e-12, max_iter=50)
    np.testing.assert_allclose(est.payload["eigenvalues"], np.sort(eigs)[::-1], atol=1e-14)
    assert est.hvp_count == 3 and est.settings["max_iter"] == 3


def test_spectral_norm_of_indefinite_operator():
    eigs = np.concatenate([[3.0, 2.0], np.linspace(-1, 1, 30), [-12.0]])
    est = spectral_norm(DenseOperator(symmetric_with_spectrum(eigs)), tol=1e-10)
    assert est.quantity == "spectral_norm" and est.payload["signed_eigenvalue"] < 0
    assert abs(est.value - 12.0) <= est.error and est.error <= 1e-9
    lo, hi = est.payload["interval"]
    assert lo <= 12.0 <= hi and est.error_kind == "probabilistic" and est.payload["certified_side"] == "lower"
    assert est.payload["lambda_max_lower_bound"] <= 3.0 + 1e-12


def test_mlp_hessian_top_and_bottom_to_1e8():
    model, batches = make_mlp(), make_batches(3)
    true = np.linalg.eigvalsh(dense_hessian(model, batches))
    op = BatchHessianOperator(model, batches)
    est = lanczos(op, k=1, which="both", tol=1e-10)
    assert est.converged and op.hvp_count == est.hvp_count
    lam_max, lam_min = est.payload["eigenvalues"]
    scale = np.abs(true).max()
    assert abs(lam_max - true[-1]) <= RTOL * scale and abs(lam_min - true[0]) <= RTOL * scale


def test_record_is_one_json_line():
    est = lanczos(DenseOperator(symmetric_with_spectrum(SPECTRA["tiny"])), k=1).with_provenance(run="r", step=3)
    line = est.to_json()
    assert "\n" not in line and json.loads(line)["provenance"] == {"run": "r", "step": 3}
    assert json.loads(line)["settings"]["operator"] == {"kind": "dense", "n": 3}


def test_non_finite_product_is_a_failed_record():
    matrix = symmetric_with_spectrum(SPECTRA["indefinite"])
    matrix[0, 0] = np.nan
    est = lanczos(DenseOperator(matrix), k=1)
    assert est.value is None and not est.converged and est.status.startswith("failed at step 1")
    assert json.loads(est.to_json())["value"] is None


@pytest.mark.parametrize("kwargs, match", [
    ({"k": 4}, "exceeds the operator dimension 3"),
    ({"k": 0}, "k=0"),
    ({"which": "top"}, "which='top'"),
    ({"tol": 0.0}, "tol=0.0"),
    ({"k": 2, "max_iter": 1}, "max_iter=1"),
    ({"v0": torch.zeros(3)}, "v0 is zero"),
    ({"v0": torch.ones(4)}, r"expected \(3,\)"),
    ({"v0": np.ones((3, 1))}, r"shape \(3, 1\)"),
])
def test_bad_input_raises_user_error(kwargs, match):
    with pytest.raises(UserError, match=match):
        lanczos(DenseOperator(np.eye(3)), **kwargs)


def test_empty_operator_raises_user_error():
    with pytest.raises(UserError, match="dimension 0"):
        lanczos(DenseOperator(np.zeros((0, 0))))


@pytest.mark.filterwarnings("ignore:Using backward:UserWarning")
def test_agrees_with_pyhessian():
    """PyHessian's power iteration finds the largest-|lambda| eigenvalue; it stops when the estimate changes by
    less than tol (relative), so its own error can exceed tol: we allow 10 x its tol."""
    from pyhessian import hessian

    model, batches = make_mlp(dtype=torch.float32), make_batches(1, batch_size=40, dtype=torch.float32)
    x, y = batches[0]
    torch.manual_seed(0)
    top, _ = hessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False).eigenvalues(maxIter=500, tol=1e-5)
    model64, batches64 = make_mlp(dtype=torch.float64), [(x.double(), y)]
    est = lanczos(BatchHessianOperator(model64, batches64), k=1, which="magnitude", tol=1e-10)
    assert est.converged
    assert abs(top[0] - est.value) <= 10 * 1e-5 * abs(est.value)
