"""What one unit of a checkpoint sweep computes: the measures, their solver intervals and their data error bars.

Measures (hessian_tools.sweep.MEASURES groups them):
  params.lambda_max, params.spectral_norm   Lanczos on the parameter-space Hessian H (largest, largest |lambda|)
  layer.lambda_max                          the same on S H S, S = rms(W_i) per tensor (operators.LayerScaled)
  elementwise.lambda_max                    on diag|w| H diag|w| (operators.ElementwiseScaled)
  adam.sharpness                            on P^-1/2 H P^-1/2, Adam's preconditioner from the checkpoint's AdamW
                                            state (operators.AdamPreconditioned): lambda_max(P^-1 H), beside 38 / lr
  params.sample_size_curve                  params.lambda_max on the first 1, 2, 4, ..., N batches
  activation.spectral_norm                  ||H_b|| at a site, H_b the Hessian of batch b's mean loss with respect to
                                            that batch's activation tensor, averaged over the N batches
  activation.scale_free                     the same for ms_b H_b, ms_b = the batch's mean squared activation
  bound.hxx                                 theory.verify's row for one layer (measured ||H_xx|| and the bound)
  params.density, params.trace              SLQ density on a fixed grid; Hutch++ trace

Solver error. value +- error contains payload["interval"] and error_kind says what holds (records.Estimate):
for Lanczos in float32 "measured" (it rests on the measured rounding of float32 products; the lower side is
certified by interlacing, the upper fails with probability payload["failure_probability"]), in float64
"probabilistic". An activation measure's interval is the mean of the per-batch intervals: the lower side
certified, the upper failing with probability at most the sum of the per-batch failure probabilities.

Data error, payload["data_error"] (None when not measured):
- parameter-space measures (all but density and trace), with n_groups >= 8: the delete-one-group jackknife over
  n_groups disjoint groups of the batches (estimators.data_error): a bias-corrected value, its standard error
  and a 68 % t interval for the population value, the quantity on the Hessian of the expected loss.
- activation measures, with N >= 2 batches: the per-batch values v_b, their mean, standard error
  std(v_b) / sqrt(N) and a 68 % t interval (N - 1 degrees of freedom) for E_b[v_b], the expected value on a
  batch of batch_size sequences. Not the jackknife: the activation operator of N batches is block diagonal, so
  its extreme eigenvalue is max_b (w_b ||H_b||), which shrinks as 1/N and has no population limit; that value
  is kept as payload["block_diagonal_norm"].
With `fuse_batches` the batches of every parameter-space operator are evaluated as one concatenated batch (the
same mean loss, one product instead of one per batch; memory that of all its sequences at once), and the
jackknife rebuilds each leave-one-out operator that way.
Warm starts: each Lanczos measure starts from the previous checkpoint's top Ritz vector of the same run and
measure (in memory; lanczos always mixes in seeded noise, on which the upper bound rests, so a cold and a warm
solve agree within their intervals).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import re
import time

import numpy as np
import torch
from scipy import stats

from hessian_tools.errors import UserError
from hessian_tools.records import Estimate

QUANTITY = {"params.lambda_max": "lambda_max", "params.spectral_norm": "spectral_norm",
            "layer.lambda_max": "lambda_max", "elementwise.lambda_max": "lambda_max", "adam.sharpness": "lambda_max",
            "params.sample_size_curve": "lambda_max", "activation.spectral_norm": "spectral_norm",
            "activation.scale_free": "spectral_norm", "bound.hxx": "hxx_norm", "params.density": "density",
            "params.trace": "trace"}
SCALING = {"params.lambda_max": None, "params.spectral_norm": None, "layer.lambda_max": "layer",
           "elementwise.lambda_max": "elementwise", "adam.sharpness": "adam"}  # the jackknifed Lanczos measures
LEVEL = 0.68  # the data intervals' confidence level
KIND_ORDER = ("certified", "probabilistic", "measured", "estimate")  # weakest last


def fuse(batches) -> list:
    """[one batch]: the batches' tensors concatenated along the batch dimension (equal shapes otherwise)."""
    batches = list(batches)
    if len(batches) < 2:
        return batches
    shapes = {tuple(t.shape[1:]) for b in batches for t in b}
    if len(shapes) != 1:
        raise UserError(f"fuse_batches needs batches of one sequence length, got shapes {sorted(shapes)}")
    return [tuple(torch.cat(parts) for parts in zip(*batches))]


def as_spectral_norm(est: Estimate) -> Estimate:
    """A which="magnitude" Lanczos estimate as ||H||_2 (value |theta|, the signed eigenvalue in the payload)."""
    if est.value is None:
        return dataclasses.replace(est, quantity="spectral_norm")
    payload = {**est.payload, "signed_eigenvalue": est.value}
    return dataclasses.replace(est, quantity="spectral_norm", value=abs(est.value), payload=payload)


def jackknife_summary(jk: Estimate) -> dict:
    """The jackknife record reduced to what a sweep record keeps in payload["data_error"]."""
    p = jk.payload
    keep = ("union_value", "bias", "standard_error", "interval", "level", "leave_one_out_values",
            "bias_to_standard_error", "warning", "solver_error_propagated")
    return {"method": "jackknife", "status": jk.status, "value": jk.value, "n_groups": jk.settings["n_groups"],
            "group_size": jk.settings["group_size"], "hvp_count": jk.hvp_count,
            "combination": (p.get("operators") or {}).get("combination"), **{k: p.get(k) for k in keep}}


def per_batch_summary(values: list[float], level: float = LEVEL) -> dict | None:
    """Mean, standard error and t interval of per-batch values (None for fewer than 2)."""
    n = len(values)
    if n < 2:
        return None
    mean = float(np.mean(values))
    se = float(np.std(values, ddof=1)) / math.sqrt(n)
    t = float(stats.t.ppf((1 + level) / 2, n - 1))
    return {"method": "per-batch", "status": "ok", "value": mean, "standard_error": se, "interval":
            [mean - t * se, mean + t * se], "level": level, "t_quantile": t, "n_batches": n, "values": list(values)}


def weakest_kind(kinds) -> str:
    """The weakest of several error kinds (certified < probabilistic < measured < estimate)."""
    return max(kinds, key=lambda k: KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER))


def mean_of_estimates(ests: list[Estimate], factors: list[float], weights: list[float], settings: dict) -> Estimate:
    """The mean over batches of factor_b x est_b (per-batch Lanczos spectral norms), its interval the mean of
    the per-batch intervals, and the per-batch data error (module docstring)."""
    failed = [(b, e.status) for b, e in enumerate(ests) if e.status != "ok"]
    hvps, wall = sum(e.hvp_count for e in ests), sum(e.wall_time_s for e in ests)
    if failed:
        return Estimate("spectral_norm", None, None, "none", False, hvps, wall, settings,
                        status=f"failed: batch {failed[0][0]}: {failed[0][1]}")
    values = [f * e.value for f, e in zip(factors, ests)]
    intervals = [[f * x for x in e.payload["interval"]] for f, e in zip(factors, ests)]
    value = float(np.mean(values))
    lo, hi = float(np.mean([i[0] for i in intervals])), float(np.mean([i[1] for i in intervals]))
    total = sum(weights)
    payload = {"interval": [lo, hi], "certified_side": "lower",
               "failure_probability": float(sum(e.payload["failure_probability"] for e in ests)),
               "per_batch_values": values, "per_batch_intervals": intervals, "per_batch_factors": factors,
               "block_diagonal_norm": max(w / total * v for w, v in zip(weights, values)),
               "data_error": per_batch_summary(values)}
    return Estimate("spectral_norm", value, max(value - lo, hi - value), weakest_kind([e.error_kind for e in ests]),
                    all(e.converged for e in ests), hvps, wall, settings, payload=payload)


def _warm_startable(solve):
    """`solve` with an explicit (op, v0, return_vectors) signature, as data_error.warm_startable wants."""
    def estimator(op, v0=None, return_vectors=False):
        return solve(op, v0=v0, return_vectors=return_vectors)
    return estimator


class Measurer:
    """Measures the units of loaded checkpoints; keeps warm-start vectors across the checkpoints of a run and the
    per-batch activation solves of the current checkpoint (the raw and scale-free measures share them)."""

    def __init__(self, settings):
        self.s = settings
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[settings.dtype]
        self.warm: dict = {}
        self.checked: dict = {}
        self.activation: dict = {}

    def lanczos(self, which: str, **kw) -> Estimate:
        from hessian_tools.estimators import lanczos

        s = self.s
        return functools.partial(lanczos, k=1, which=which, tol=s.tol, max_iter=s.max_iter, seed=s.seed, **kw)

    def solver(self, which: str):
        """op, v0, return_vectors -> Estimate: Lanczos with the settings (|value| for "magnitude")."""
        solve = self.lanczos(which)
        if which == "magnitude":
            return _warm_startable(lambda op, **kw: as_spectral_norm(solve(op, **kw)))
        return _warm_startable(solve)

    def params_factory(self, ckpt, scaling: str | None):
        """batches -> the parameter-space operator of `scaling` (None, layer, elementwise, adam) on them."""
        from hessian_tools.operators import SCALINGS, AdamPreconditioned, AdamState, ParamHessian

        model, dtype, fused = ckpt.model, self.dtype, self.s.fuse_batches
        build = lambda b: ParamHessian(model, fuse(b) if fused else b, dtype=dtype)  # noqa: E731
        if scaling is None:
            return build
        if scaling == "adam":
            state = AdamState.from_checkpoint(ckpt)
            return lambda b: AdamPreconditioned(build(b), state)
        wrap = SCALINGS[scaling]
        return lambda b: wrap(build(b))

    def guard(self, model, batches, run_key) -> dict:
        """The engine's self-check (finite, symmetric, equal to gradient differences), once per run; a failed
        check raises its UserError again for every later unit of the run."""
        from hessian_tools.operators import ParamHessian, self_check

        if run_key not in self.checked:
            try:
                self.checked[run_key] = self_check(ParamHessian(model, batches[:1], dtype=self.dtype), seed=self.s.seed)
            except UserError as exc:
                self.checked[run_key] = exc
        if isinstance(self.checked[run_key], UserError):
            raise self.checked[run_key]
        return self.checked[run_key]

    def measure(self, unit, ckpt, batches) -> Estimate:
        """The Estimate of one unit (see the module docstring); UserError (or any exception) when it cannot
        be measured."""
        if unit.measure.startswith("activation."):
            return self._activation(unit, ckpt.model, batches)
        if unit.measure == "bound.hxx":
            return self._bound(unit, ckpt.model, batches)
        check = self.guard(ckpt.model, batches, str(unit.run_dir))
        if unit.measure in SCALING:
            est = self._jackknifed(unit, ckpt, batches)
        elif unit.measure == "params.sample_size_curve":
            from hessian_tools.estimators import sample_size_curve

            est = sample_size_curve(self.params_factory(ckpt, None), batches, self.solver("largest"))
        elif unit.measure == "params.density":
            from hessian_tools.estimators import slq_density

            s = self.s
            est = slq_density(self.params_factory(ckpt, None)(batches), s.density_probes, s.density_iter,
                              grid=s.density_grid, width=s.density_width, seed=s.seed)
        elif unit.measure == "params.trace":
            from hessian_tools.estimators import hutchpp_trace

            est = hutchpp_trace(self.params_factory(ckpt, None)(batches), self.s.trace_matvecs, seed=self.s.seed)
        else:
            raise AssertionError(unit.measure)
        return dataclasses.replace(est, settings={**est.settings, "self_check": check})

    def _jackknifed(self, unit, ckpt, batches) -> Estimate:
        """Lanczos on the (scaled) parameter-space operator, warm-started; with n_groups the jackknife."""
        from hessian_tools.estimators import jackknife

        s = self.s
        make_op = self.params_factory(ckpt, SCALING[unit.measure])
        solve = self.solver("magnitude" if unit.measure == "params.spectral_norm" else "largest")
        key = (str(unit.run_dir), unit.measure)
        est = solve(make_op(batches), v0=self.warm.get(key), return_vectors=True)
        if est.vectors is not None:
            self.warm[key] = est.vectors[:, 0]
        payload = {**est.payload, "data_error": None}
        if s.n_groups and est.status == "ok":
            jk = jackknife(make_op, batches, solve, s.n_groups, level=LEVEL, union=est,
                           combine="rebuild" if s.fuse_batches else "auto")
            payload["data_error"] = jackknife_summary(jk)
            est = dataclasses.replace(est, hvp_count=est.hvp_count + jk.hvp_count)
        if unit.measure == "adam.sharpness" and est.value is not None:
            payload["adam"] = _adam_thresholds(est)
        return dataclasses.replace(est, payload=payload, vectors=None)

    def _activation(self, unit, model, batches) -> Estimate:
        """The mean over batches of the per-batch spectral norm at the site (raw, or times ms_b)."""
        from hessian_tools.operators import ActivationHessian, ScaleFree

        if unit.site is None:
            raise UserError("no activation site: the checkpoint's recorded config could not be read")
        key = (str(unit.checkpoint), unit.site)
        if key not in self.activation:
            solve, ests, ms, weights, ops = self.lanczos("magnitude"), [], [], [], []
            for batch in batches:
                op = ActivationHessian(model, [batch], unit.site, dtype=self.dtype)
                ests.append(as_spectral_norm(solve(op)))
                ms.append(float(op.space.mean_square))
                weights.append(op.total_weight)
                ops.append(op)
            self.activation = {key: (ests, ms, weights, ops[0].settings(), ScaleFree(ops[0]).settings())}
        ests, ms, weights, raw_settings, free_settings = self.activation[key]
        free = unit.measure == "activation.scale_free"
        settings = {**{k: v for k, v in ests[0].settings.items() if k != "operator"}, "method": "per-batch lanczos",
                    "operator": free_settings if free else raw_settings,
                    "per_batch": "one operator per batch; settings.operator is batch 0's"}
        if free:
            settings["scale_free"] = ("ms_b x the raw per-batch solve: ScaleFree(H_b) = ms_b H_b, a positive "
                                      "scalar times H_b, so its Lanczos run is the raw one scaled")
        return mean_of_estimates(ests, ms if free else [1.0] * len(ests), weights, settings)

    def _bound(self, unit, model, batches) -> Estimate:
        """theory.verify's row; its measured ||H_xx|| is a float64 Lanczos spectral norm: the lower side certified,
        the upper one failing with at most spectral_norm's default failure probability."""
        from hessian_tools.estimators.lanczos import spectral_norm
        from theory.verify import Settings, verify_bound

        if unit.site is None:
            raise UserError("no layer: the checkpoint's recorded config could not be read")
        start = time.perf_counter()
        (row,) = verify_bound(model, batches, f"^{re.escape(unit.site)}$", Settings(tol=self.s.tol, seed=self.s.seed))
        chance = inspect.signature(spectral_norm).parameters["failure_probability"].default
        payload = {**row, "certified_side": "lower", "failure_probability": chance}
        return Estimate("hxx_norm", row["measured"], row["measured_error"], "probabilistic", bool(row["converged"]),
                        int(row.get("hvp_count") or 0), time.perf_counter() - start,
                        {"method": "theory.verify", "tol": self.s.tol, "seed": self.s.seed, "dtype": "float64"},
                        payload=payload)


def _adam_thresholds(est: Estimate) -> dict:
    """beta1, the lrs and Adam's stability threshold (2 + 2 beta1) / ((1 - beta1) lr) of the record's scaling."""
    scaling = est.settings["operator"]["scaling"]
    beta1 = scaling["beta1"]
    limit = lambda lr: (2 + 2 * beta1) / ((1 - beta1) * lr) if lr else None  # noqa: E731
    return {"beta1": beta1, "lr_peak": scaling["lr_peak"], "threshold_peak": limit(scaling["lr_peak"]),
            "lr_at_step": scaling["lr_at_step"], "threshold_at_step": limit(scaling["lr_at_step"])}
