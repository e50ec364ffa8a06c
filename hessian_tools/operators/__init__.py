"""Curvature operators and their guard.

- `ParamHessian(model, batches, loss_fn=None, params=None, dtype=None, mode="auto", ...)`
- `ActivationHessian(model, batches, site, loss_fn=None, dtype=None, mode="auto", ...)`
- `GaussNewton(model, batches, site=None, params=None, output_fn=None, output_loss=None, dtype=None, ...)`
- Rescaled coordinates around any of them (`scaled.py`, `adam_preconditioned.py`): `LayerScaled(op)`,
  `ElementwiseScaled(op)`, `AdamPreconditioned(op, AdamState.from_checkpoint(ckpt))` in parameter space,
  `ScaleFree(op)` at an activation site; `SCALINGS` maps the names recorded in settings["scaled"] to them.
- `self_check(op, seed=0) -> dict`, `list_sites(model)`, `MODES`.
Every operator is a `CurvatureOperator`: shape, dtype, device, hvp_count, mode, matvec, matmat, to_scipy, settings.
"""

from hessian_tools.operators.activation_hessian import ActivationHessian
from hessian_tools.operators.adam_preconditioned import AdamPreconditioned, AdamState
from hessian_tools.operators.base import CurvatureOperator
from hessian_tools.operators.gauss_newton import GaussNewton
from hessian_tools.operators.hvp import MODES
from hessian_tools.operators.param_hessian import ParamHessian
from hessian_tools.operators.scaled import ElementwiseScaled, LayerScaled, ScaledOperator, ScaleFree
from hessian_tools.operators.self_check import self_check
from hessian_tools.operators.sites import list_sites

SCALINGS = {"layer": LayerScaled, "elementwise": ElementwiseScaled, "adam": AdamPreconditioned,
            "scale-free": ScaleFree}

__all__ = [
    "MODES",
    "SCALINGS",
    "ActivationHessian",
    "AdamPreconditioned",
    "AdamState",
    "CurvatureOperator",
    "ElementwiseScaled",
    "GaussNewton",
    "LayerScaled",
    "ParamHessian",
    "ScaleFree",
    "ScaledOperator",
    "list_sites",
    "self_check",
]
