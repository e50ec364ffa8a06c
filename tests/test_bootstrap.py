"""The data-sampling error bar: disjoint groups of batches and bootstrap resamples."""

import functools

import numpy as np
import pytest
from helpers import BatchHessianOperator, DenseOperator, make_batches, make_mlp, symmetric_with_spectrum

from hessian_tools import UserError
from hessian_tools.estimators import data_spread, hutchinson_trace, lanczos

# Eight "batches", each a symmetric matrix: the operator on a group is their mean.
rng = np.random.default_rng(0)
BATCHES = [symmetric_with_spectrum(np.concatenate([[5.0 + rng.normal()], rng.uniform(-1, 1, 19)]), seed=i)
           for i in range(8)]


def mean_operator(batches):
    return DenseOperator(np.mean(batches, axis=0))


def test_group_values_mean_and_spread():
    est = data_spread(mean_operator, BATCHES, functools.partial(lanczos, k=1, tol=1e-10), n_groups=4)
    groups = [np.linalg.eigvalsh(np.mean(BATCHES[2 * i:2 * i + 2], axis=0))[-1] for i in range(4)]
    np.testing.assert_allclose(est.payload["group_values"], groups, rtol=1e-9)
    assert est.value == pytest.approx(np.mean(groups), rel=1e-9)
    assert est.error == pytest.approx(np.std(groups, ddof=1), rel=1e-6)
    assert est.error_kind == "group-std" and est.quantity == "lambda_max" and est.converged
    assert est.payload["solver_error_kind"] == "probabilistic"
    assert est.payload["mean_solver_error"] < 1e-3 * est.error  # here the data dominate, and it shows
    assert est.payload["std_error_of_mean"] == pytest.approx(est.error / 2)
    assert est.settings["group_size"] == 2 and est.hvp_count > 0


def test_bootstrap_resamples_are_seeded():
    estimator = functools.partial(lanczos, k=1, tol=1e-8)
    a = data_spread(mean_operator, BATCHES, estimator, n_groups=2, n_bootstrap=5, seed=3)
    b = data_spread(mean_operator, BATCHES, estimator, n_groups=2, n_bootstrap=5, seed=3)
    assert a.payload["bootstrap_values"] == b.payload["bootstrap_values"]
    assert len(a.payload["bootstrap_values"]) == 5 and a.payload["bootstrap_std"] > 0


def test_mlp_trace_spread_against_solver_error():
    model, batches = make_mlp(), make_batches(4, batch_size=8)
    est = data_spread(lambda b: BatchHessianOperator(model, b), batches,
                      functools.partial(hutchinson_trace, n_samples=10, seed=0), n_groups=2)
    assert len(est.payload["group_values"]) == 2 and est.payload["solver_error_kind"] == "standard-error"
    assert est.payload["mean_solver_error"] > 0 and est.error > 0


def test_failed_group_is_a_failed_record():
    bad = [b.copy() for b in BATCHES[:4]]
    bad[3][0, 0] = np.nan
    est = data_spread(mean_operator, bad, functools.partial(lanczos, k=1), n_groups=2)
    assert est.value is None and est.status.startswith("failed: 1 of 2 runs failed")


@pytest.mark.parametrize("n_batches, n_groups, match", [(7, 2, "7 batches cannot form 2 equal groups"),
                                                        (8, 1, "n_groups=1")])
def test_bad_input_raises_user_error(n_batches, n_groups, match):
    with pytest.raises(UserError, match=match):
        data_spread(mean_operator, BATCHES[:n_batches], lanczos, n_groups=n_groups)
