"""Sharpness tracked while a model trains, beside the stability threshold of the optimizer at that step's lr.

At step s (the weights after s updates: those of checkpoint s; s = 0 is the initialisation) a `SharpnessTracker`
measures, on fixed batches (the same at every step), by Lanczos:
- "params.lambda_max": lambda_max(H), H the Hessian of the mean loss over the batches w.r.t. all parameters;
- "adam.sharpness" (Adam / AdamW only, from s = 1 on): lambda_max(P^-1 H), P = diag(sqrt(v / (1 - beta2^t)) +
  eps) from the live optimizer state after update s (hessian_tools.operators.adam_preconditioned, Cohen et
  al. 2022's convention).
Each measure is warm-started from the previous measurement's Ritz vector (lanczos mixes seeded Gaussian
noise into it, so a stale vector cannot hide a new top direction; the noise seed is the step). Products use
double backward (a fixed mode, so a resumed run repeats the uninterrupted one exactly).

Cost and error. Lanczos stops when its interval is within `tol` relative or after `max_hvps` steps, whichever
comes first; the record reports the interval it reached, whatever its width (error_kind and
failure_probability say what holds: lanczos's module docstring). A warm start sharpens the estimate at a fixed
budget; the guaranteed interval costs the same HVPs as from a cold start. float32 products add one float64 product
per eigenvalue that measures the rounding the interval rests on ("measured").

Record, one JSON line per measure and step (`record`): {"kind": "sharpness", "step", "measure", "value",
"error", "error_kind", "interval", "failure_probability", "converged", "hvp_count", "lanczos_steps",
"wall_time_s", "lr", "threshold", "threshold_rule", "status", "settings"}. lr is the learning rate of the
update that follows step s (the last update's at the last step); threshold the stability limit at that lr of
the optimizer the measure belongs to: 2 / lr for H (gradient descent), (2 + 2 beta1) / ((1 - beta1) lr) for
P^-1 H (Adam with momentum beta1; 38 / lr at beta1 = 0.9). A failed measurement has status != "ok" and a null
value.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from hessian_tools.errors import UserError

MEASURES = ("params.lambda_max", "adam.sharpness")
MODE = "double-backward"
KIND = "sharpness"


@dataclass(frozen=True)
class TrackSettings:
    """every: measure at steps 0, every, 2 every, ... and the last; tol: relative width at which Lanczos stops;
    max_hvps: Lanczos steps per eigenvalue (the budget); dtype of the products; failure_probability of the
    uncertified side."""

    every: int
    tol: float = 1e-2
    max_hvps: int = 20
    dtype: str = "float32"
    failure_probability: float = 1e-3

    def due(self, step: int, last: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == last)


def gd_threshold(lr: float) -> float:
    """2 / lr: gradient descent on a quadratic with curvature lambda is stable iff lambda < 2 / lr."""
    return 2.0 / lr


def adam_threshold(lr: float, beta1: float) -> float:
    """(2 + 2 beta1) / ((1 - beta1) lr): heavy-ball momentum beta1 (Adam's EMA form) with the preconditioner frozen
    is stable iff lambda_max(P^-1 H) is below it (Cohen et al. 2022); 38 / lr at beta1 = 0.9."""
    return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)


def adam_beta1(optimizer) -> float | None:
    """The optimizer's beta1 if it is Adam-like (one value over its groups), else None."""
    betas = {g["betas"][0] for g in optimizer.param_groups if "betas" in g}
    if len(betas) > 1:
        raise UserError(f"the optimizer's groups use different beta1 {sorted(betas)}; the Adam threshold needs one")
    return float(betas.pop()) if betas else None


class SharpnessTracker:
    """Measures the tracked sharpness of a model on fixed `batches` (see the module docstring).

    batches: [(inputs, targets)] of the loss `loss_fn(model, batch)` (default: next-token cross-entropy);
    describe: what the batches are, copied into every record's settings. `vectors` holds the warm starts
    {measure: float64 CPU vector}: save it with a checkpoint and restore it on resume.
    """

    def __init__(self, settings: TrackSettings, batches, loss_fn=None, describe: dict | None = None):
        self.settings, self.batches, self.loss_fn = settings, list(batches), loss_fn
        self.describe = dict(describe or {})
        self.vectors: dict[str, torch.Tensor] = {}

    def measure(self, model, optimizer, step: int, lr: float) -> list[dict]:
        """The records of step `step` for `model` as it stands, trained by `optimizer` (whose state and beta1
        give the Adam measure); `lr` the learning rate the thresholds are taken at."""
        from hessian_tools.operators import AdamPreconditioned, AdamState, ParamHessian

        beta1 = adam_beta1(optimizer)
        wanted = [("params.lambda_max", gd_threshold(lr), "2 / lr (gradient descent)")]
        if beta1 is not None and step > 0:
            wanted.append(("adam.sharpness", adam_threshold(lr, beta1),
                           f"(2 + 2 beta1) / ((1 - beta1) lr) (Adam, beta1 = {beta1:g})"))
        start = time.perf_counter()
        try:
            base = ParamHessian(model, self.batches, loss_fn=self.loss_fn, dtype=self.settings.dtype, mode=MODE)
            ops = {"params.lambda_max": base}
            if len(wanted) > 1:
                ops["adam.sharpness"] = AdamPreconditioned(base, AdamState.from_optimizer(model, optimizer))
        except UserError as exc:  # e.g. a loss that is no longer finite on the measurement batches
            reason = f"failed: {exc}"
            return [self.record(step, measure, None, lr, threshold, rule, time.perf_counter() - start, reason)
                    for measure, threshold, rule in wanted]
        return [self.record(step, measure, self._lanczos(ops[measure], measure, step), lr, threshold, rule)
                for measure, threshold, rule in wanted]

    def _lanczos(self, op, measure: str, step: int):
        from hessian_tools.estimators import lanczos

        s = self.settings
        est = lanczos(op, k=1, which="largest", tol=s.tol, max_iter=s.max_hvps, seed=step,
                      v0=self.vectors.get(measure), return_vectors=True, failure_probability=s.failure_probability)
        if est.status == "ok" and est.vectors is not None:
            self.vectors[measure] = est.vectors[:, 0].detach().to("cpu", torch.float64).clone()
        return est

    def record(self, step: int, measure: str, est, lr: float, threshold: float, rule: str,
               wall_time_s: float = 0.0, status: str | None = None) -> dict:
        """The metrics line of one measure at one step (est None: a failure with `status`)."""
        s = self.settings
        settings = {**self.describe, "tol": s.tol, "max_hvps": s.max_hvps, "dtype": s.dtype, "mode": MODE,
                    "warm_start": bool(est is not None and est.settings.get("warm_start"))}
        out = {"kind": KIND, "step": step, "measure": measure, "value": None, "error": None, "error_kind": "none",
               "interval": None, "failure_probability": None, "converged": False, "hvp_count": 0,
               "lanczos_steps": 0, "wall_time_s": wall_time_s, "lr": lr, "threshold": threshold,
               "threshold_rule": rule, "status": status or "ok", "settings": settings}
        if est is not None:
            d = est.to_dict()  # JSON-safe: a non-finite bound becomes null
            p = d["payload"]
            out.update(value=d["value"], error=d["error"], error_kind=d["error_kind"], interval=p.get("interval"),
                       failure_probability=p.get("failure_probability"), converged=d["converged"],
                       hvp_count=d["hvp_count"], lanczos_steps=p.get("steps", 0), wall_time_s=d["wall_time_s"],
                       status=d["status"])
        return out
