"""Data error bars calibrated on a synthetic population with a known answer.

The population imitates a loss Hessian: each batch's matrix is a mean of per-sample PSD outer products
(x x^T with x ~ N(0, C)) plus a fixed indefinite part D and zero-mean indefinite per-sample terms, so
E[H_batch] = C + D has a known spectrum, and lambda_max of a mean of few batches is biased upward
(lambda_max is convex in the matrix).
"""

import functools
import json

import numpy as np
import pytest
import torch
from helpers import BatchHessianOperator, DenseOperator, make_batches, make_mlp
from operator_refs import tiny_gpt, token_batches
from scipy import stats
from scipy.linalg import block_diag

from hessian_tools.errors import UserError
from hessian_tools.estimators.batch_groups import BatchGroups, split_groups
from hessian_tools.estimators import hutchpp_trace, jackknife, lanczos, sample_size_curve
from hessian_tools.estimators.data_error import default_sizes, jackknife_statistics
from hessian_tools.operators import ActivationHessian, ParamHessian

N_TRIALS, N_BATCHES = 200, 8


class Population:
    """Per-batch matrices H_b = D + (1/m) sum_i (x_i x_i^T + sigma (a_i b_i^T + b_i a_i^T) / 2), n x n."""

    def __init__(self, n=100, samples_per_batch=8, sigma=1.0, spike=10.0, seed=0):
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        self.factor = q * np.sqrt(np.concatenate([[spike], np.linspace(2.0, 0.1, n - 1)]))  # C = F F^T
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


solve = functools.partial(lanczos, k=1, tol=1e-6)  # eigenvalue error ~ (tol lambda)^2 / gap ~ 1e-11
exact_trace = functools.partial(hutchpp_trace, n_matvecs=3 * POPULATION.n)  # a sketch of rank n: exact


def coverage(interval, truth, seed):
    """Fraction of N_TRIALS draws of N_BATCHES batches whose interval(batches) = (low, high) contains truth."""
    rng, hits = np.random.default_rng(seed), 0
    for _ in range(N_TRIALS):
        low, high = interval(POPULATION.batches(rng, N_BATCHES))
        hits += low <= truth <= high
    return hits / N_TRIALS


def jackknife_interval(estimator):
    def interval(batches):
        est = jackknife(mean_operator, batches, estimator, n_groups=N_BATCHES, combine="rebuild")
        assert est.status == "ok" and est.payload["level"] == 0.68
        return est.payload["interval"]

    return interval


@pytest.fixture(scope="module")
def lambda_max_draws():
    """(truth, jackknife records of lambda_max on N_TRIALS draws of N_BATCHES batches).

    combine="rebuild" makes one product per step here (a reweighting of 8 dense groups costs 8, for the same
    values: test_jackknife_reweighted_equals_rebuilt)."""
    rng = np.random.default_rng(1)
    return POPULATION.eigenvalues[-1], [jackknife(mean_operator, POPULATION.batches(rng, N_BATCHES), solve,
                                                  combine="rebuild") for _ in range(N_TRIALS)]


def two_halves_interval(batches):
    """What the sweep reported: union +- std / sqrt(2) of the estimates on two disjoint halves."""
    union = solve(mean_operator(batches)).value
    halves = [solve(mean_operator(batches[:4])).value, solve(mean_operator(batches[4:])).value]
    se = np.std(halves, ddof=1) / np.sqrt(2)
    return union - se, union + se


def test_68_percent_jackknife_intervals_cover_60_to_76_percent_of_200_trials(lambda_max_draws):
    """lambda_max: convex in the data, so the union estimate is biased upward; the bias-corrected interval holds."""
    truth, records = lambda_max_draws
    assert all(r.status == "ok" and r.payload["level"] == 0.68 for r in records)
    hits = [r.payload["interval"][0] <= truth <= r.payload["interval"][1] for r in records]
    assert 0.60 <= np.mean(hits) <= 0.76


def test_trace_intervals_cover_60_to_76_percent_of_200_trials():
    """The trace (linear in the data: no bias), on the same draws."""
    assert 0.60 <= coverage(jackknife_interval(exact_trace), POPULATION.eigenvalues.sum(), seed=1) <= 0.76


def test_two_halves_error_bar_undercovers():
    """The defect the jackknife replaces, on the same population (so the calibration test can fail)."""
    assert coverage(two_halves_interval, POPULATION.eigenvalues[-1], seed=1) < 0.50


def test_eigenvalue_in_a_cluster_is_flagged():
    """lambda_min of the population sits in a cluster narrower than the data noise: f is not smooth there, the
    bias dwarfs the standard error (coverage measured 40 %), and every record says so; lambda_max rarely."""
    rng = np.random.default_rng(15)
    smallest = functools.partial(lanczos, which="smallest", tol=1e-6)
    records = [jackknife(mean_operator, POPULATION.batches(rng, N_BATCHES), smallest, combine="rebuild")
               for _ in range(5)]
    assert all(r.payload["bias_to_standard_error"] > 3 and "interval undercovers" in r.payload["warning"]
               for r in records)


def test_smooth_estimates_are_not_flagged(lambda_max_draws):
    records = lambda_max_draws[1]
    assert np.mean([r.payload["warning"] is not None for r in records]) < 0.05


def test_union_is_biased_upward_and_the_jackknife_removes_most_of_it(lambda_max_draws):
    truth, records = lambda_max_draws
    union = np.array([r.payload["union_value"] for r in records])
    corrected = np.array([r.value for r in records])
    root_n = np.sqrt(len(records))  # standard errors of the means over the draws
    assert union.mean() - truth > 3 * union.std() / root_n  # measured: 0.38 against 0.074
    assert abs(corrected.mean() - truth) < 3 * corrected.std() / root_n  # measured: -0.17 against 0.078
    assert np.mean([r.payload["bias"] for r in records]) > 3 * union.std() / root_n  # measured: 0.55


def test_jackknife_values_and_formulas_against_dense_eigenvalues():
    batches = POPULATION.batches(np.random.default_rng(4), 16)
    est = jackknife(mean_operator, batches, solve, n_groups=8, level=0.9)
    groups = [np.mean(batches[2 * g:2 * g + 2], axis=0) for g in range(8)]
    loo = [np.linalg.eigvalsh(np.mean(groups[:g] + groups[g + 1:], axis=0))[-1] for g in range(8)]
    union = np.linalg.eigvalsh(np.mean(batches, axis=0))[-1]
    p = est.payload
    np.testing.assert_allclose(p["leave_one_out_values"], loo, rtol=1e-9)
    assert p["union_value"] == pytest.approx(union, rel=1e-9)
    bias = 7 * (np.mean(loo) - union)
    se = np.sqrt(7 / 8 * np.sum((np.array(loo) - np.mean(loo)) ** 2))
    t = stats.t.ppf(0.95, 7)
    assert p["bias"] == pytest.approx(bias, rel=1e-6) and est.value == pytest.approx(union - bias, rel=1e-9)
    assert est.error == pytest.approx(se, rel=1e-6) == p["standard_error"]
    assert p["interval"] == pytest.approx([union - bias - t * se, union - bias + t * se], rel=1e-9)
    assert p["t_quantile"] == pytest.approx(t) and p["degrees_of_freedom"] == 7 and p["level"] == 0.9
    assert est.error_kind == "jackknife" and est.quantity == "lambda_max" and est.converged
    assert est.settings["group_size"] == 2 and p["solver_error_kind"] == "probabilistic"
    assert 0 < p["solver_error_propagated"] < 1e-3 * est.error  # the data dominate here, and it shows
    cost = p["hvp_cost"]
    assert cost["total"] == cost["union"] + sum(cost["leave_one_out"]) + cost["check"] == est.hvp_count
    assert len(cost["leave_one_out"]) == 8 and p["operators"]["combination"] == "weighted sum"


def test_linear_statistic_has_zero_bias_and_the_classical_standard_error():
    """For a mean (the trace) the jackknife is exact: no bias, SE = std of the group values / sqrt(G)."""
    values = np.random.default_rng(5).normal(size=8)
    union = values.mean()
    loo = [(8 * union - v) / 7 for v in values]
    jk = jackknife_statistics(union, loo, 0.68)
    assert jk["bias"] == pytest.approx(0, abs=1e-12) and jk["value"] == pytest.approx(union)
    assert jk["standard_error"] == pytest.approx(np.std(values, ddof=1) / np.sqrt(8), rel=1e-12)


def test_warm_started_leave_one_out_solves_agree_with_cold_ones_at_no_extra_cost():
    """Lanczos converges on its guaranteed interval, which rests on the seeded random part of any start, so a warm
    start cannot buy the guarantee sooner (estimators/lanczos.py); it must not cost more or change the values."""
    rng = np.random.default_rng(6)
    big = Population(n=200, samples_per_batch=400, spike=6.0, seed=1)
    batches = big.batches(rng, 8)
    estimator = functools.partial(lanczos, k=1, tol=1e-8)
    warm = jackknife(mean_operator, batches, estimator)
    cold = jackknife(mean_operator, batches, lambda op: estimator(op))  # hides v0: cold starts
    assert warm.settings["warm_start"] and not cold.settings["warm_start"]
    np.testing.assert_allclose(warm.payload["leave_one_out_values"], cold.payload["leave_one_out_values"],
                               rtol=1e-7)
    for w, c in zip(warm.payload["hvp_cost"]["leave_one_out"], cold.payload["hvp_cost"]["leave_one_out"]):
        assert w <= c + 2


def assert_unions_match_rebuilt(make_op, batches, how):
    """Every leave-one-out union of 8 groups, reweighted, equals make_op on its batches (one product each)."""
    groups = split_groups(batches, 8, 8)
    grouped = BatchGroups(make_op, groups)
    assert grouped.how == how and grouped.mismatch < 1e-12 and grouped.check_hvps == 3
    everyone = list(range(8))
    full = grouped.operator(everyone)
    v = torch.randn(full.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for g in (0, 5):
        rest = everyone[:g] + everyone[g + 1:]
        direct = make_op([b for h in rest for b in groups[h]])
        w = grouped.restrict(v, everyone, rest)
        assert w.shape[0] == direct.shape[0]
        torch.testing.assert_close(grouped.operator(rest).matvec(w), direct.matvec(w), rtol=1e-10, atol=1e-12)


def test_reweighted_groups_equal_rebuilt_operators_with_unequal_batch_sizes():
    """H_union = sum_g (W_g / W) H_g with W_g the loss terms: batch sizes 3..10 make the weights matter."""
    model = make_mlp()
    assert_unions_match_rebuilt(lambda b: BatchHessianOperator(model, b), make_batches(8, batch_size=3),
                                "weighted sum")


@pytest.mark.parametrize("space, how", [("params", "weighted sum"), ("activation", "block diagonal")])
def test_gpt_operators_reweighted_as_sum_or_blocks(space, how):
    model, batches = tiny_gpt("simplegpt"), token_batches(sizes=(1, 2) * 4)
    if space == "params":
        make_op = functools.partial(ParamHessian, model, params=r"layers\.0\.attention\.snq\.", mode="double-backward")
    else:
        make_op = functools.partial(ActivationHessian, model, site="layers.0.feed_forward:in", mode="double-backward")
    assert_unions_match_rebuilt(make_op, batches, how)


def weighted_mean_operator(batches):
    """Batches (matrix, weight): the operator of their weighted mean, total_weight the sum of the weights."""
    total = sum(w for _, w in batches)
    return DenseOperator(sum(w * m for m, w in batches) / total, total_weight=total)


def test_jackknife_reweighted_equals_rebuilt():
    batches = list(zip(POPULATION.batches(np.random.default_rng(14), 8), np.arange(1.0, 9.0)))
    auto = jackknife(weighted_mean_operator, batches, solve)
    rebuilt = jackknife(weighted_mean_operator, batches, solve, combine="rebuild")
    assert auto.payload["operators"]["combination"] == "weighted sum"
    assert rebuilt.payload["operators"]["combination"] == "rebuilt"
    np.testing.assert_allclose(auto.payload["leave_one_out_values"], rebuilt.payload["leave_one_out_values"],
                               rtol=1e-9)
    assert auto.value == pytest.approx(rebuilt.value, rel=1e-9)


def block_operator(batches):
    """One block per batch, weighted 1/N: the structure of an activation-space Hessian of the mean loss."""
    return DenseOperator(block_diag(*[m / len(batches) for m in batches]))


def test_extreme_eigenvalue_of_a_per_batch_space_is_flagged_but_its_trace_is_not():
    batches = Population(n=10, seed=2).batches(np.random.default_rng(16), 8)
    top = jackknife(block_operator, batches, solve)
    assert top.payload["operators"]["combination"] == "block diagonal"
    assert top.payload["union_value"] == pytest.approx(max(np.linalg.eigvalsh(m)[-1] for m in batches) / 8)
    assert "one block per batch" in top.payload["warning"]
    trace = jackknife(block_operator, batches, functools.partial(hutchpp_trace, n_matvecs=240))
    assert trace.payload["warning"] is None
    assert trace.value == pytest.approx(np.mean([np.trace(m) for m in batches]), rel=1e-9)


def test_factory_that_is_not_a_reweighting_is_rebuilt():
    """A data-dependent scale (here the number of batches) breaks H_union = sum w_g H_g: caught, then rebuilt."""
    batches = POPULATION.batches(np.random.default_rng(7), 8)
    make_op = lambda b: DenseOperator(np.mean(b, axis=0) * len(b))  # noqa: E731
    est = jackknife(make_op, batches, solve)
    assert est.payload["operators"]["combination"] == "rebuilt" and est.payload["operators"]["mismatch"] > 0.1
    loo = [np.linalg.eigvalsh(np.sum(batches[:g] + batches[g + 1:], axis=0))[-1] for g in range(8)]
    np.testing.assert_allclose(est.payload["leave_one_out_values"], loo, rtol=1e-9)


def test_union_given_is_not_solved_again():
    batches = POPULATION.batches(np.random.default_rng(8), 8)
    union = solve(mean_operator(batches), return_vectors=True)
    est = jackknife(mean_operator, batches, solve, union=union)
    assert not est.settings["union_solved_here"] and est.payload["union_value"] == union.value
    assert est.hvp_count == est.payload["hvp_cost"]["total"] - union.hvp_count


def test_failed_group_is_a_failed_record_that_keeps_what_was_computed():
    batches = POPULATION.batches(np.random.default_rng(9), 8)
    batches[5] = batches[5].copy()
    batches[5][0, 0] = np.nan
    est = jackknife(mean_operator, batches, solve, combine="rebuild", union=solve(mean_operator(batches[:1])))
    assert est.value is None and est.error is None and est.status.startswith("failed: leaving out group 0")
    assert est.payload["union_value"] is not None and est.payload["leave_one_out_values"] == [None]
    assert json.loads(est.to_json())["value"] is None  # strict JSON: no NaN anywhere
    whole = jackknife(mean_operator, batches, solve)
    assert whole.value is None and whole.status.startswith("failed: the estimate on the union")


def test_sample_size_curve_shows_the_drift_and_carries_bars_where_groups_allow():
    batches = POPULATION.batches(np.random.default_rng(10), 32)
    curve = sample_size_curve(mean_operator, batches, solve, n_groups=8)
    points = curve.payload["points"]
    assert [p["n_batches"] for p in points] == [1, 2, 4, 8, 16, 32] == curve.payload["sizes"]
    for p in points:
        assert p["value"] == pytest.approx(np.linalg.eigvalsh(np.mean(batches[:p["n_batches"]], axis=0))[-1],
                                           rel=1e-9)
        assert p["status"] == "ok" and p["solver_error_kind"] == "probabilistic"
        assert p["solver_error"] <= 1e-6 * p["value"]
        assert (p["jackknife"] is None) == (p["n_batches"] < 8)
    assert [p["jackknife"]["settings"]["group_size"] for p in points[3:]] == [1, 2, 4]
    assert points[-1]["jackknife"]["payload"]["union_value"] == points[-1]["value"] == curve.value
    assert curve.error_kind == "probabilistic" and curve.status == "ok" and curve.quantity == "lambda_max"
    assert curve.hvp_count == sum(p["hvp_count"] for p in points)
    plain = sample_size_curve(mean_operator, batches, solve)
    assert all(p["jackknife"] is None for p in plain.payload["points"])


def test_sample_size_curve_keeps_points_before_a_failure():
    batches = POPULATION.batches(np.random.default_rng(11), 8)
    batches[6] = batches[6].copy()
    batches[6][1, 1] = np.inf
    curve = sample_size_curve(mean_operator, batches, solve, n_groups=8)
    statuses = [p["status"] for p in curve.payload["points"]]
    assert statuses[:3] == ["ok"] * 3 and statuses[3].startswith("failed")
    assert curve.value is None and curve.status.startswith("failed: at 8 batches")
    assert all(p["value"] is not None for p in curve.payload["points"][:3])


def test_default_sizes():
    assert default_sizes(1) == [1] and default_sizes(8) == [1, 2, 4, 8] and default_sizes(24) == [1, 2, 4, 8, 16, 24]


@pytest.mark.parametrize("kwargs, match", [
    ({"n_groups": 4}, "n_groups=4 must be an integer >= 8"),
    ({"n_groups": 3.0}, "must be an integer"),
    ({"n_batches": 12}, "12 batches cannot form 8 equal groups"),
    ({"level": 1.0}, "strictly between 0 and 1"),
    ({"combine": "sum"}, "combine='sum' must be one of auto, rebuild"),
])
def test_bad_input_raises_user_error(kwargs, match):
    batches = POPULATION.batches(np.random.default_rng(12), kwargs.pop("n_batches", 8))
    with pytest.raises(UserError, match=match):
        jackknife(mean_operator, batches, solve, **kwargs)


@pytest.mark.parametrize("sizes, match", [([2, 1], "increasing"), ([0, 4], "between 1"), ([1, 9], "between 1")])
def test_bad_sizes_raise_user_error(sizes, match):
    with pytest.raises(UserError, match=match):
        sample_size_curve(mean_operator, POPULATION.batches(np.random.default_rng(13), 8), solve, sizes=sizes)


def test_per_batch_activation_intervals_cover_60_to_76_percent_of_200_trials():
    """The activation sites' data error bar (mean of per-batch norms, t interval): on a synthetic skewed
    population of per-batch values with a known mean, nominal 68 % intervals from 8 batches cover 60-76 %."""
    import numpy as np

    from hessian_tools.sweep_measures import per_batch_summary

    rng = np.random.default_rng(0)
    truth = 2.0  # the mean of a gamma(4, 0.5) population
    hits = 0
    for _ in range(200):
        values = rng.gamma(4.0, 0.5, size=8)
        s = per_batch_summary(list(values))
        assert s["standard_error"] == pytest.approx(np.std(values, ddof=1) / np.sqrt(8))
        hits += s["interval"][0] <= truth <= s["interval"][1]
    assert 0.60 <= hits / 200 <= 0.76, hits
