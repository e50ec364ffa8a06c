"""Stochastic Lanczos quadrature against dense spectra: normalisation, moments, exactness, comparability."""

import numpy as np
import pytest
from helpers import (SPECTRA, BatchHessianOperator, DenseOperator, dense_hessian, make_batches, make_mlp,
                     symmetric_with_spectrum)

from hessian_tools import UserError
from hessian_tools.estimators import hutchinson_trace, slq_density


def test_density_integrates_to_one_and_moments_match():
    eigs = SPECTRA["indefinite"]
    matrix = symmetric_with_spectrum(eigs, seed=1)
    op = DenseOperator(matrix)
    est = slq_density(op, n_probes=20, n_iter=30, grid=(-12.0, 13.0, 2001), width=0.2, seed=3)
    x, density = np.array(est.payload["grid"]), np.array(est.payload["density"])
    assert est.hvp_count == op.hvp_count == 20 * 30
    # The grid reaches > 10 widths past the spectrum: the Gaussian tails outside are below 1e-20.
    assert abs(est.payload["mass_on_grid"] - 1.0) <= 1e-12
    assert abs(np.trapezoid(density, x) - 1.0) <= 1e-6  # trapezoid error, step 0.0125 << width
    m0, m1, m2 = est.payload["moments"]
    s0, s1, s2 = est.payload["moment_std_errors"]
    assert abs(m0 - 1.0) <= 1e-12 and s0 <= 1e-12
    assert est.value == m1 and est.error == s1 > 0
    assert abs(m1 - eigs.mean()) <= 3 * s1
    assert abs(m2 - (eigs**2).mean()) <= 3 * s2
    # Interlacing: every node lies inside the spectrum.
    nodes = np.concatenate(est.payload["nodes"])
    assert nodes.min() >= eigs.min() - 1e-10 and nodes.max() <= eigs.max() + 1e-10


def test_first_moment_is_hutchinson_over_n_on_the_same_probes():
    matrix = symmetric_with_spectrum(SPECTRA["clustered"], seed=2)
    slq = slq_density(DenseOperator(matrix), n_probes=8, n_iter=10, seed=11)
    hutch = hutchinson_trace(DenseOperator(matrix), n_samples=8, seed=11, block_size=1)
    assert abs(slq.value - hutch.value / matrix.shape[0]) <= 1e-12


def test_full_krylov_space_recovers_the_spectrum():
    eigs = SPECTRA["tiny"]
    est = slq_density(DenseOperator(symmetric_with_spectrum(eigs)), n_probes=3, n_iter=10, seed=0)
    assert est.settings["n_iter"] == 3
    for nodes in est.payload["nodes"]:
        np.testing.assert_allclose(nodes, np.sort(eigs), atol=1e-12)


def test_fixed_grid_and_width_are_kept():
    grid = (-5.0, 5.0, 101)
    a = slq_density(DenseOperator(symmetric_with_spectrum(SPECTRA["tiny"])), grid=grid, width=0.5, n_iter=3)
    assert a.settings["grid"] == [-5.0, 5.0, 101] and a.payload["width"] == 0.5
    np.testing.assert_allclose(a.payload["grid"], np.linspace(-5, 5, 101))
    narrow = slq_density(DenseOperator(symmetric_with_spectrum(SPECTRA["indefinite"])), grid=grid, width=0.5)
    assert narrow.payload["mass_on_grid"] < 0.95  # eigenvalues 10, 7, -6, -9 lie off this grid: reported


def test_mlp_hessian_moments():
    model, batches = make_mlp(), make_batches(2)
    eigs = np.linalg.eigvalsh(dense_hessian(model, batches))
    est = slq_density(BatchHessianOperator(model, batches), n_probes=6, n_iter=20, seed=0)
    assert abs(est.value - eigs.mean()) <= 3 * est.error
    assert abs(est.payload["mass_on_grid"] - 1.0) <= 1e-3  # default grid pads the Ritz range by 5 %


@pytest.mark.parametrize("kwargs, match", [({"n_probes": 1}, "n_probes=1"), ({"grid": (1.0, 0.0, 10)}, "grid="),
                                           ({"width": 0.0}, "width=0.0"), ({"n_iter": 0}, "n_iter=0")])
def test_bad_input_raises_user_error(kwargs, match):
    with pytest.raises(UserError, match=match):
        slq_density(DenseOperator(np.eye(3)), **kwargs)
