"""What the extreme-eigenvalue error bars promise, tested on matrices with known spectra.

Every Lanczos / power record states an interval for its quantity: the certified side holds given the arithmetic,
the other holds except with probability `failure_probability` over the random start (module docstring of
hessian_tools.estimators.lanczos). These tests reproduce the review's failures (issue 9, items 2-4) and check
the promise: coverage over many random starts, clusters, adversarial warm starts, float32 operators.
"""

import numpy as np
import pytest
import torch
from helpers import DenseOperator, symmetric_with_spectrum
from operator_refs import tiny_gpt, token_batches

from hessian_tools.estimators import lanczos, power_iteration, spectral_norm
from hessian_tools.operators import ParamHessian

TOL = 1e-6
# The review's cluster: 4 top eigenvalues spread over 2 tol, a bulk below. With the residual interval the old
# code reported as certified, lambda_max was missed in 24 of these 40 trials (worst 4.1x the bound).
CLUSTER = 1.0 - 2 * TOL * np.linspace(0.0, 1.0, 4)
CLUSTERED = np.concatenate([CLUSTER, np.linspace(-1.0, 0.0, 96)])


def covers(est, truth) -> bool:
    """value +- error holds the truth (what plots draw), and so does the stated interval."""
    return abs(est.value - truth) <= est.error and est.payload["interval"][0] <= truth <= est.payload["interval"][1]


def test_top_cluster_is_covered_and_reported_as_a_cluster():
    misses, sizes = 0, []
    for trial in range(40):
        est = lanczos(DenseOperator(symmetric_with_spectrum(CLUSTERED, seed=trial)), tol=TOL, seed=trial)
        misses += not covers(est, 1.0)
        if misses:
            continue  # counted: the assertion below reports how many
        assert est.error_kind in ("probabilistic", "certified") and est.payload["certified_side"] in ("lower", "both")
        cluster = est.payload["clusters"]["top"]
        lo, hi = cluster["interval"]
        assert lo <= min(cluster["ritz_values"]) and hi >= 1.0  # encloses its Ritz values and lambda_max
        nearest = np.abs(np.array(cluster["ritz_values"])[:, None] - CLUSTER[None, :]).min(axis=1)
        assert np.all(nearest <= np.array(cluster["residuals"]))  # each stands for an eigenvalue of the cluster
        if est.converged:
            sizes.append(cluster["size"])
    assert misses == 0, f"lambda_max outside value +- error in {misses} of 40 trials"
    # A single start resolves a cluster member only once its component has been amplified: in 38 of 40 trials
    # all four were found by the time lambda_max was pinned to tol; in the other two, 2 and 1 (the rest lay more
    # than tol from every Ritz value, so they are not reported as part of the cluster).
    assert len(sizes) == 40 and sizes.count(4) >= 35


def test_warm_start_orthogonal_to_the_top_eigenvector_still_finds_lambda_max():
    """H = diag(5, A) with A's top eigenvalue 4 and v0 = (0, a): every product keeps the first entry exactly 0, so
    a start trusted alone never sees lambda_max = 5 (the old code reported 4, converged)."""
    matrix = np.zeros((60, 60))
    matrix[0, 0] = 5.0
    matrix[1:, 1:] = symmetric_with_spectrum(np.concatenate([[4.0], np.linspace(-1.0, 1.0, 58)]), seed=2)
    v0 = torch.cat([torch.zeros(1), torch.randn(59, generator=torch.Generator().manual_seed(0))]).double()
    est = lanczos(DenseOperator(matrix), tol=1e-8, v0=v0)
    assert covers(est, 5.0) and abs(est.value - 5.0) <= 1e-7
    assert est.settings["warm_start"] and est.settings["warm_start_noise"] > 0


def test_float32_interval_contains_the_float64_lambda_max():
    """The float32 operator's products carry rounding; its interval, propagated from the measured rounding, must
    hold the float64 answer, and the stop comes at the rounding floor instead of chasing tol 1e-8."""
    for arch in ("simplegpt", "gpt2", "llama2"):
        model, batches = tiny_gpt(arch), token_batches((2, 1))
        exact = lanczos(ParamHessian(model, batches, dtype=torch.float64, mode="rev-rev"), tol=1e-10)
        est = lanczos(ParamHessian(model, batches, dtype=torch.float32, mode="rev-rev"), tol=1e-8)
        assert covers(est, exact.value), (arch, est.payload["interval"], exact.value)
        assert est.error_kind == "measured" and est.converged and est.payload["limited_by_rounding"]
        assert est.payload["rounding"] > 0 and est.error <= 1e-4 * abs(est.value)  # not vacuous


@pytest.mark.parametrize("delta", [0.5, 0.05])
def test_coverage_of_the_probabilistic_upper_bound(delta):
    """200 random starts on matrices with known spectra, stopped early so the upper side matters: the interval
    holds lambda_max in at least 1 - delta of them, and the bound is within a few hundred times the true error."""
    spectra = [np.concatenate([[1.0], 0.99 - np.geomspace(1e-3, 1.0, 79)]),  # small gap, graded bulk
               np.concatenate([[2.0, 1.9], np.linspace(-1.0, 1.0, 78)]),
               np.concatenate([CLUSTER, np.linspace(-1.0, 0.0, 76)])]
    held, ratios = 0, []
    for trial in range(200):
        eigs = spectra[trial % 3]
        est = lanczos(DenseOperator(symmetric_with_spectrum(eigs, seed=trial)), tol=1e-12, max_iter=12, seed=trial,
                      failure_probability=delta)
        lo, hi = est.payload["interval"]
        held += lo <= eigs.max() <= hi
        ratios.append((hi - est.value) / (eigs.max() - est.value))
        assert est.payload["failure_probability"] == delta and not est.converged
    assert held >= (1 - delta) * 200
    assert np.median(ratios) <= 200


def test_kato_temple_is_a_flagged_estimate():
    """Inside a cluster the estimated gap is far too large and r^2 / gap falls below the true error."""
    below = 0
    for trial in range(10):
        est = lanczos(DenseOperator(symmetric_with_spectrum(CLUSTERED, seed=trial)), tol=TOL, max_iter=10,
                      seed=trial)
        kato = est.payload["kato_temple"]
        assert kato["kind"] == "estimate"
        below += kato["values"][0] is not None and kato["values"][0] < 1.0 - est.value
    assert below >= 5  # why it is an estimate


MIRRORED = np.concatenate([-CLUSTER[::-1] - 1.0, np.linspace(-1.0, 1.0, 96)])  # bottom cluster below -2 + ...


@pytest.mark.parametrize("which", ["smallest", "both", "magnitude", "spectral_norm"])
def test_bottom_and_magnitude_follow_the_same_rules(which):
    eigs = np.concatenate([-1.0 - CLUSTER, np.linspace(-1.0, 1.5, 96)])  # |lambda_min| ~ 2 > lambda_max 1.5
    truth = {"smallest": eigs.min(), "both": eigs.max(), "magnitude": abs(eigs.min()),
             "spectral_norm": abs(eigs.min())}[which]
    for trial in range(12):
        op = DenseOperator(symmetric_with_spectrum(eigs, seed=trial))
        est = (spectral_norm(op, tol=TOL, seed=trial) if which == "spectral_norm"
               else lanczos(op, which=which, tol=TOL, seed=trial))
        lo, hi = est.payload["interval"]
        assert lo <= truth <= hi, (trial, lo, hi, truth)
        value = abs(est.value) if which in ("magnitude", "spectral_norm") else est.value
        assert abs(value - truth) <= est.error
        assert est.payload["certified_side"] in (("upper",) if which == "smallest" else ("lower",)) + ("both",)
    if which == "both":
        bottom_lo, bottom_hi = est.payload["intervals"][1]
        assert bottom_lo <= eigs.min() <= bottom_hi


def test_power_iteration_interval_holds_in_a_cluster():
    """Power iteration's residual says only that SOME eigenvalue is near: in the cluster it stops after ~20 products
    with the residual interval missing lambda_max in most trials (15 of 20); its interval for |lambda|_max holds."""
    eigs = np.concatenate([CLUSTER, np.linspace(-0.5, 0.0, 56)])
    misses_old_style = 0
    for trial in range(20):
        est = power_iteration(DenseOperator(symmetric_with_spectrum(eigs, seed=trial)), tol=TOL, seed=trial)
        lo, hi = est.payload["interval"]
        assert lo <= 1.0 <= hi and abs(abs(est.value) - 1.0) <= est.error
        assert est.error_kind == "probabilistic" and est.payload["certified_side"] == "lower"
        t, r = est.payload["eigenvalues"][0], est.payload["residuals"][0]
        misses_old_style += not abs(t - 1.0) <= r
    assert misses_old_style >= 10  # the residual interval alone would have missed lambda_max
