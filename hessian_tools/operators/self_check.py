"""The guard run before every long computation: one product checked three ways.

1. finite (else: the batch whose loss or product is not finite is named);
2. symmetric: |u.Hv - v.Hu| / max(|u| |Hv|, |v| |Hu|) below SYMMETRY_TOL[dtype];
3. equal to central differences of the gradient in float64, (g(x0 + h v) - g(x0 - h v)) / 2h for a unit v,
   h = eps^(1/3) * max(1, max|x0|) (eps = float64 machine epsilon, x0 the point, or the activation's scale),
   relative 2-norm error below DIFFERENCE_TOL[dtype] (float32 products carry float32 rounding).
For a float32 operator it also reports that rounding, `rounding_rel` = ||H32 v - H64 v|| / ||H64 v|| with H64 the
float64 twin at the same point (the estimators measure their own bound the same way; 0 for float64).
Costs 2 counted products of `op` and 2 float64 gradients (+ 1 float64 product for a float32 operator).
"""

import math

import torch

from hessian_tools.errors import UserError
from hessian_tools.operators.batches import DTYPES

SYMMETRY_TOL = {torch.float64: 1e-8, torch.float32: 1e-3}
DIFFERENCE_TOL = {torch.float64: 1e-5, torch.float32: 1e-2}


def self_check(op, seed: int = 0) -> dict:
    """Check `op` (a ParamHessian, ActivationHessian or GaussNewton) at its point; UserError naming the failure."""
    n = op.shape[0]
    gen = torch.Generator().manual_seed(seed)
    u, v = (torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(2))
    u, v = u / u.norm(), v / v.norm()
    Hv, Hu = op.matvec(v), op.matvec(u)
    if not (torch.isfinite(Hv).all() and torch.isfinite(Hu).all()):
        bad = next((b for b, term in enumerate(op.block_products(v)) if not torch.isfinite(term).all()), None)
        where = f" on batch {bad}" if bad is not None else ""
        raise UserError(f"the Hessian-vector product is not finite{where}; check that batch and the model's weights")
    Hv, Hu = Hv.cpu(), Hu.cpu()
    scale = max(float(u @ u) ** 0.5 * float(Hv.norm()), float(Hu.norm()), torch.finfo(torch.float64).tiny)
    symmetry = abs(float(u @ Hv) - float(v @ Hu)) / scale
    twin = op if op.dtype == torch.float64 else op.with_dtype(torch.float64)
    step = torch.finfo(torch.float64).eps ** (1 / 3) * max(1.0, op.space.scale)
    fd = ((twin.gradient(step * v) - twin.gradient(-step * v)) / (2 * step)).cpu()
    denom = max(float(fd.norm()), float(Hv.norm()), torch.finfo(torch.float64).tiny)
    difference = float((Hv - fd).norm()) / denom
    rounding = 0.0
    if twin is not op:
        exact = twin.matvec(v).cpu()
        rounding = float((Hv - exact).norm()) / max(float(exact.norm()), torch.finfo(torch.float64).tiny)
    report = {
        "finite": True,
        "symmetry_rel": symmetry,
        "difference_rel": difference,
        "difference_step": step,
        "rounding_rel": rounding,
        "dtype": DTYPES[op.dtype],
        "mode": op.mode,
        "tolerances": {"symmetry": SYMMETRY_TOL[op.dtype], "difference": DIFFERENCE_TOL[op.dtype]},
        "seed": seed,
    }
    if not math.isfinite(symmetry) or symmetry > SYMMETRY_TOL[op.dtype]:
        raise UserError(f"the {op.kind} operator is not symmetric (relative asymmetry {symmetry:.2e}); "
                        f"try another HVP mode or dtype=float64")
    if not math.isfinite(difference) or difference > DIFFERENCE_TOL[op.dtype]:
        raise UserError(f"the {op.kind} products disagree with differences of the gradient (relative error "
                        f"{difference:.2e} in {report['dtype']}, mode {op.mode}); try another HVP mode or float64")
    return report
