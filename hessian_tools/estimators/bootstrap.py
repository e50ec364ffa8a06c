"""The spread of one estimator over disjoint groups of batches (and bootstrap resamples): descriptive only.

The group values are estimates on 1/n_groups of the data each, so their mean is biased (lambda_max is convex
in the data) and std / sqrt(n_groups) is not an error bar of the estimate on the union: on a population
with a known answer it covered lambda_max in 34 % of 200 trials for a nominal 68 % (tests/test_data_error.py).
The data error bar of the union estimate is `data_error.jackknife`; this function stays only while
`sweep.py` still calls it.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np

from hessian_tools.estimators.batch_groups import split_groups
from hessian_tools.records import Estimate


def data_spread(make_op: Callable[[list], object], batches: Sequence, estimator: Callable[[object], Estimate],
                n_groups: int = 4, n_bootstrap: int = 0, seed: int = 0) -> Estimate:
    """Run `estimator(make_op(group))` on `n_groups` disjoint, contiguous groups of `batches`.

    make_op(list_of_batches) builds the operator on those batches (e.g. lambda b: ParamHessian(model, b));
    estimator(op) -> Estimate (e.g. functools.partial(lanczos, k=1, tol=1e-6)). len(batches) must be a
    multiple of n_groups (equal groups make the spread comparable). Optionally n_bootstrap resamples, each
    of len(batches) batches drawn with replacement (numpy Generator seeded with `seed`).
    Returns an Estimate: value = mean over groups, error = std over groups (ddof=1: the spread of an
    estimate made on one group's worth of data), error_kind "group-std"; payload: group_values,
    group_solver_errors, solver_error_kind, mean_solver_error, std_error_of_mean (std / sqrt(n_groups)),
    and with resamples bootstrap_values, bootstrap_std.
    """
    batches = list(batches)
    split = split_groups(batches, n_groups, 2)
    size = len(split[0])
    start = time.perf_counter()
    groups = [estimator(make_op(group)) for group in split]
    rng = np.random.default_rng(seed)
    resamples = [estimator(make_op([batches[j] for j in rng.integers(0, len(batches), len(batches))]))
                 for _ in range(n_bootstrap)]
    records = groups + resamples
    failed = [r.status for r in records if r.status != "ok"]
    settings = {"method": "data-spread", "n_groups": n_groups, "group_size": size, "n_bootstrap": n_bootstrap,
                "seed": seed, "estimator": groups[0].settings}
    hvps = sum(r.hvp_count for r in records)
    quantity = groups[0].quantity
    if failed:
        return Estimate(quantity, None, None, "group-std", False, hvps, time.perf_counter() - start, settings,
                        status=f"failed: {len(failed)} of {len(records)} runs failed, first: {failed[0]}")
    values = np.array([r.value for r in groups])
    spread = float(values.std(ddof=1))
    solver_errors = [r.error for r in groups]
    payload = {"group_values": values.tolist(), "group_solver_errors": solver_errors,
               "solver_error_kind": groups[0].error_kind,
               "mean_solver_error": float(np.mean(solver_errors)) if None not in solver_errors else None,
               "std_error_of_mean": spread / math.sqrt(n_groups)}
    if n_bootstrap:
        boot = np.array([r.value for r in resamples])
        payload.update(bootstrap_values=boot.tolist(),
                       bootstrap_std=float(boot.std(ddof=1)) if n_bootstrap > 1 else None)
    return Estimate(quantity, float(values.mean()), spread, "group-std", all(r.converged for r in records), hvps,
                    time.perf_counter() - start, settings, payload=payload)
