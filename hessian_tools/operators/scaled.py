"""Hessians in rescaled coordinates, D H D for a positive diagonal D: measures that compare architectures.

Writing the variable as x = x0 + D y, the Hessian in y at y = 0 is D H D. The scalings here:

- `LayerScaled(op)`: parameters, D = rms(W_i) = sqrt(mean of W_i^2) on every entry of tensor i ("per-tensor
  normalized coordinates": a step of y = 1 moves a tensor by its own rms).
- `ElementwiseScaled(op)`: parameters, D = diag|w| (adaptive sharpness, Kwon et al. 2021, ASAM; without ASAM's
  eta, so a zero entry, e.g. a bias at its initial 0, contributes a zero row and column).
- `ScaleFree(op)`: an activation site, D = sqrt(ms) I with ms = the mean of a^2 over every entry of the site's
  activation in all the operator's batches: the operator is ms * H.
- `hessian_tools.operators.adam_preconditioned.AdamPreconditioned`: D = P^-1/2, Adam's preconditioner.

Invariance. Let T = diag(t), t > 0, be a function-preserving rescaling: L(T theta) = L(theta) for every theta
near theta0 (a SimpleNorm weight W -> cW; a norm gain gamma -> c gamma with the maps reading it W -> W / c).
Differentiating twice, H(T theta) = T^-1 H(theta) T^-1. If t is constant on each tensor, rms(t_i W_i) =
t_i rms(W_i), so D(T theta) = T D(theta); for D = |w| that holds for any t > 0. Then D H D is the same matrix
at theta and at T theta, while the raw H of a tensor scaled by c moves as 1/c^2. Likewise at a site: if a
reparametrization turns the site's activation a into c a and the loss seen from the site f into f_c with
f_c(c b) = f(b) for all b (f_c = f when the downstream is scale-invariant, f(c b) = f(b); or, in a pre-norm
model, the whole residual stream scaled by c through the embeddings and every branch's output map), then
H_c(c a) = H(a) / c^2 and ms(c a) = c^2 ms(a), so ms * H is unchanged.
With a norm's eps > 0 scale invariance holds up to O(eps / mean square of the normalized input).
"""

from __future__ import annotations

import copy
import math

import torch

from hessian_tools.errors import UserError
from hessian_tools.operators.base import CurvatureOperator


def parameter_point(op, what: str) -> tuple[list[str], list[torch.Tensor]]:
    """(names, float64 tensors) of the parameters a parameter-space operator is taken at; UserError otherwise."""
    space = getattr(op, "space", None)
    if getattr(space, "kind", None) != "params":
        raise UserError(f"{what} rescales parameter coordinates: wrap a parameter-space operator (ParamHessian, "
                        "or GaussNewton without a site)")
    return list(space.names), [x.detach().to(torch.float64) for x in space.x0]


class ScaledOperator(CurvatureOperator):
    """D H D for the operator `op` (H) and a diagonal D = `scale`, a length-n vector or a positive number.

    Products run in `op`'s dtype on its device (the vector D v is rounded to it once); D is float64. `op` stays
    reachable as `.op` (the guard checks it: the scaling itself is exact). settings() = op's settings plus
    "scaled" (the subclass's name: "layer", "elementwise", "adam", "scale-free") and "scaling" (its convention
    and numbers). Eigenvalues of D H D are those of D^2 H (similar matrices).
    """

    scaled = "diagonal"
    convention = "D H D for a diagonal D"
    input_dtype = torch.float64  # v reaches D unrounded; `op` rounds D v to its dtype once

    def __init__(self, op, scale, details: dict | None = None):
        super().__init__(op.shape[0], op.dtype, op.device)
        self.op = op
        if isinstance(scale, torch.Tensor):
            scale = scale.to(device=self.device, dtype=torch.float64).reshape(-1)
            if scale.numel() != self.shape[0]:
                raise UserError(f"scale has {scale.numel()} entries for an operator of size {self.shape[0]}")
            ok = bool(torch.isfinite(scale).all()) and bool((scale >= 0).all())
        else:
            scale = float(scale)
            ok = math.isfinite(scale) and scale >= 0
        if not ok:
            raise UserError(f"the {self.scaled} scaling is negative or not finite; check the weights or state")
        self.scale, self.details = scale, dict(details or {})

    @property
    def mode(self) -> str:
        return self.op.mode

    @property
    def total_weight(self) -> float:
        """The wrapped operator's sum of batch weights (the DistributedOperator contract)."""
        return self.op.total_weight

    def _column_scale(self):
        return self.scale[:, None] if isinstance(self.scale, torch.Tensor) else self.scale

    def _matvec(self, v):
        return self.scale * self.op.matvec(self.scale * v)

    def _matmat(self, V):
        d = self._column_scale()
        return d * self.op.matmat(d * V)

    def with_dtype(self, dtype) -> "ScaledOperator":
        """The same D around the wrapped operator evaluated in another dtype (same point, same D)."""
        twin = copy.copy(self)
        twin.op, twin.dtype, twin.hvp_count = self.op.with_dtype(dtype), dtype, 0
        return twin

    def settings(self) -> dict:
        values = self.scale if isinstance(self.scale, torch.Tensor) else torch.tensor([self.scale])
        stats = {"scale_min": float(values.min()), "scale_max": float(values.max())}
        return {**self.op.settings(), "scaled": self.scaled,
                "scaling": {"convention": self.convention, **stats, **self.details}}


class LayerScaled(ScaledOperator):
    """S H S with S = rms(W_i) = sqrt(mean(W_i^2)) on every entry of parameter tensor i (see the module docstring).

    Invariant to W_i -> c W_i for every scale-invariant tensor and to any per-tensor rescaling that preserves
    the function. "scaling" records each tensor's rms.
    """

    scaled = "layer"
    convention = "S H S, S = rms(W_i) = sqrt(mean(W_i^2)) on every entry of parameter tensor i"

    def __init__(self, op):
        names, tensors = parameter_point(op, "--scaled layer")
        rms = [float(t.pow(2).mean().sqrt()) if t.numel() else 0.0 for t in tensors]
        scale = torch.cat([torch.full((t.numel(),), r, dtype=torch.float64) for t, r in zip(tensors, rms)])
        super().__init__(op, scale, {"tensor_rms": dict(zip(names, rms))})


class ElementwiseScaled(ScaledOperator):
    """diag|w| H diag|w| (adaptive sharpness, Kwon et al. 2021): invariant to any positive elementwise rescaling
    of the parameters that preserves the function. "scaling" records how many entries are exactly 0."""

    scaled = "elementwise"
    convention = "diag|w| H diag|w| over the selected parameters w (adaptive sharpness, no eta)"

    def __init__(self, op):
        _, tensors = parameter_point(op, "--scaled elementwise")
        scale = torch.cat([t.reshape(-1) for t in tensors]).abs()
        super().__init__(op, scale, {"zero_entries": int((scale == 0).sum())})


class ScaleFree(ScaledOperator):
    """ms * H at an activation site, ms = mean of a^2 over every entry of the site's activation in all batches
    (the operator's own batches, measured on its plain forward passes). Unchanged when a function-preserving
    reparametrization scales the activation by c (module docstring). "scaling" records ms."""

    scaled = "scale-free"
    convention = ("ms * H, ms = mean of a^2 over every entry of the site's activation a in all measurement "
                  "batches")

    def __init__(self, op):
        space = getattr(op, "space", None)
        if getattr(space, "kind", None) != "activation":
            raise UserError("--scale-free multiplies an activation Hessian by the site's mean squared activation: "
                            "wrap an activation-space operator (ActivationHessian, or GaussNewton at a site)")
        ms = float(space.mean_square)
        super().__init__(op, math.sqrt(ms), {"mean_square": ms})
