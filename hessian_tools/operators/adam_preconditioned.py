"""Adam's preconditioned Hessian P^-1/2 H P^-1/2, whose eigenvalues are those of P^-1 H (similar matrices).

Convention (Cohen et al. 2022, "Adaptive gradient methods at the edge of stability", whose code, init2winit's
diagonal preconditioner with bias correction on, builds Adam's P as sqrt(nu / (1 - beta2^count)) + eps):
P = diag(sqrt(v_hat) + eps), v_hat = v / (1 - beta2^t), with v = the optimizer's `exp_avg_sq` and t = its `step`
for that parameter, both as the checkpoint (or the live optimizer) holds them after its t-th update (so P is
the denominator of that update; PyTorch's AdamW divides by exactly this).
Adam's first-moment bias correction 1 / (1 - beta1^t) scales the step, not P; it is within beta1^t of 1
(< 1e-4 from t = 88 on at beta1 = 0.9). In the local quadratic model with P frozen, Adam with lr eta is stable
while lambda_max(P^-1 H) < (2 + 2 beta1) / ((1 - beta1) eta), 38 / eta at beta1 = 0.9.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hessian_tools.errors import UserError
from hessian_tools.operators.scaled import ScaledOperator, parameter_point


@dataclass(frozen=True)
class AdamState:
    """Adam's second moments and settings: v (`exp_avg_sq`, not bias-corrected) and step t per parameter name,
    beta1, beta2, eps; lr_peak and lr_at_step (the lr of the checkpoint's last update) where known."""

    second_moments: dict
    steps: dict
    beta1: float
    beta2: float
    eps: float
    lr_peak: float | None = None
    lr_at_step: float | None = None

    @classmethod
    def from_checkpoint(cls, ckpt) -> "AdamState":
        """From any checkpoint that holds AdamW state (a toolkit `train` run, a full torchtitan DCP directory, a
        nanoGPT ckpt.pt): its second moments and steps, and the betas, eps and lr its optimizer held
        (`Checkpoint.adam_settings`); a one-line UserError for a checkpoint without them. beta1, beta2 and eps
        must be the same for every parameter."""
        return cls._from_parts(ckpt.optimizer_state(), ckpt.adam_settings(), ckpt.peak_lr(), str(ckpt.path))

    @classmethod
    def from_optimizer(cls, model, optimizer, lr_peak: float | None = None) -> "AdamState":
        """From a live torch.optim.Adam / AdamW over `model`'s parameters, as it stands after its last update
        (copies: later updates do not change this state). lr_at_step is its param groups' current lr."""
        if not all("betas" in g and "eps" in g for g in optimizer.param_groups):
            raise UserError(f"{type(optimizer).__name__} has no Adam betas and eps: the preconditioned sharpness "
                            "needs Adam or AdamW")
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        state, settings = {}, {}
        for name, p in model.named_parameters():
            if id(p) in groups:
                settings[name] = groups[id(p)]
                state[name] = {k: v.detach().clone() if hasattr(v, "detach") else v
                               for k, v in optimizer.state.get(p, {}).items()}
        return cls._from_parts(state, settings, lr_peak, type(optimizer).__name__)

    @classmethod
    def _from_parts(cls, state: dict, settings: dict, lr_peak, source: str) -> "AdamState":
        """state {name: {"exp_avg_sq", "step", ...}}, settings {name: {"betas", "eps", "lr", ...}}."""
        shared = {(tuple(s["betas"]), float(s["eps"])) for s in settings.values()}
        if len(shared) != 1:
            raise UserError(f"{source}: its parameter groups use different Adam betas or eps ({sorted(shared)}); "
                            "the preconditioned sharpness needs one set")
        ((beta1, beta2), eps), = shared
        lrs = {float(s["lr"]) for s in settings.values()}
        moments = {name: s["exp_avg_sq"] for name, s in state.items() if "exp_avg_sq" in s}
        steps = {name: int(s["step"]) for name, s in state.items() if "step" in s}
        return cls(moments, steps, float(beta1), float(beta2), eps, lr_peak, lrs.pop() if len(lrs) == 1 else None)

    def denominator(self, name: str) -> torch.Tensor:
        """sqrt(v / (1 - beta2^t)) + eps for parameter `name` (float64)."""
        if name not in self.second_moments or self.steps.get(name, 0) < 1:
            raise UserError(f"the optimizer state holds no second moment for parameter {name!r} (no update yet?)")
        t = self.steps[name]
        v = self.second_moments[name].to(torch.float64)
        return (v / (1 - self.beta2**t)).sqrt() + self.eps


class AdamPreconditioned(ScaledOperator):
    """P^-1/2 H P^-1/2 with P = diag(sqrt(v_hat) + eps) (module docstring) over `op`'s parameters, `state` an
    AdamState (AdamState.from_checkpoint(ckpt), or AdamState.from_optimizer(model, optimizer) during training).
    "scaling" records beta1, beta2, eps, the steps and lrs."""

    scaled = "adam"
    convention = ("P^-1/2 H P^-1/2, P = diag(sqrt(v / (1 - beta2^t)) + eps), v = Adam's exp_avg_sq and t its step "
                  "at the checkpoint; eigenvalues = those of P^-1 H")

    def __init__(self, op, state: AdamState):
        names, tensors = parameter_point(op, "--scaled adam")
        parts = []
        for name, tensor in zip(names, tensors):
            p = state.denominator(name)
            if p.shape != tensor.shape:
                raise UserError(f"Adam's second moment of {name!r} has shape {tuple(p.shape)}, the parameter "
                                f"{tuple(tensor.shape)}")
            parts.append(p.reshape(-1))
        steps = sorted({state.steps[name] for name in names})
        details = {"beta1": state.beta1, "beta2": state.beta2, "eps": state.eps, "steps": steps,
                   "lr_peak": state.lr_peak, "lr_at_step": state.lr_at_step}
        super().__init__(op, torch.cat(parts).rsqrt(), details)
