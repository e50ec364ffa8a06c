"""The guard run before every long computation: one product checked three ways.

1. finite (else: the batch whose loss or product is not finite is named);
2. symmetric: |u.Hv - v.Hu| / max(|u| |Hv|, |v| |Hu|) below SYMMETRY_TOL[dtype];
3. equal to central differences of the gradient in float64, (g(x0 + h v) - g(x0 - h v)) / 2h for a unit v,
   relative 2-norm error below the difference tolerance. First h = h0 = eps^(1/3) * max(1, max|x0|) (eps =
   float64 machine epsilon, x0 the point, or the activation's scale), optimal for a gradient exact to float64,
   tolerance DIFFERENCE_TOL[dtype]. A model that computes in float32 inside (Hugging Face's RMSNorm and softmax
   upcast to float32, which for a float64 model rounds to float32) has a gradient with a rounding noise floor
   N far above float64's, which swamps h0. When h0 fails, the floor is measured from the second difference
   N = |g(x0 + h0 v) + g(x0 - h0 v) - 2 g(x0)| / 2 (its curvature part is O(h0^2)), the steps of STEP_LADDER
   are tried, and the best step is accepted within max(DIFFERENCE_TOL, NOISE_MARGIN * N / (h |Hv|)), the error
   the floor allows at that step. The report says which floor, step and tolerance it found.
For a float32 operator it also reports that rounding, `rounding_rel` = ||H32 v - H64 v|| / ||H64 v|| with H64 the
float64 twin at the same point (the estimators measure their own bound the same way; 0 for float64).
Costs 2 counted products of `op` and 2 float64 gradients (+ 1 float64 product for a float32 operator; + 1 + 2
per further step when h0 fails).
"""

import math

import torch

from hessian_tools.errors import UserError
from hessian_tools.operators.batches import DTYPES

SYMMETRY_TOL = {torch.float64: 1e-8, torch.float32: 1e-3}
DIFFERENCE_TOL = {torch.float64: 1e-5, torch.float32: 1e-2}
STEP_LADDER = (1e-4, 1e-3, 1e-2)  # times max(1, scale), tried in turn when h0 is swamped by the noise floor
NOISE_MARGIN = 10.0
FLOAT64_FLOOR = 1e-12  # a relative gradient noise floor above this is not float64 rounding


def _rel(a, b) -> float:
    return float((a - b).norm()) / max(float(a.norm()), float(b.norm()), torch.finfo(torch.float64).tiny)


def _differences(twin, v, Hv, scale: float, tol: float) -> dict:
    """The central-difference comparison at h0, and along STEP_LADDER when the gradient's noise swamps h0."""
    h0 = torch.finfo(torch.float64).eps ** (1 / 3) * max(1.0, scale)
    plus, minus = twin.gradient(h0 * v).cpu(), twin.gradient(-h0 * v).cpu()
    best = {"step": h0, "error": _rel(Hv, (plus - minus) / (2 * h0)), "tolerance": tol, "noise_floor": None,
            "noise_floor_rel": None, "ladder": []}
    if math.isfinite(best["error"]) and best["error"] <= tol:
        return best
    g0 = twin.gradient().cpu()
    noise = float((plus + minus - 2 * g0).norm()) / 2
    best.update(noise_floor=noise, noise_floor_rel=noise / max(float(g0.norm()), torch.finfo(torch.float64).tiny),
                ladder=[[h0, best["error"]]])
    for factor in STEP_LADDER:
        h = factor * max(1.0, scale)
        error = _rel(Hv, (twin.gradient(h * v) - twin.gradient(-h * v)).cpu() / (2 * h))
        best["ladder"].append([h, error])
        if math.isfinite(error) and not error >= best["error"]:
            best.update(step=h, error=error)
    # the error the noise floor allows at the best step (it falls as 1/h; the curvature part grows as h^2)
    best["tolerance"] = max(tol, NOISE_MARGIN * noise / (best["step"] * max(float(Hv.norm()), 1e-300)))
    return best


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
    if not math.isfinite(symmetry) or symmetry > SYMMETRY_TOL[op.dtype]:
        raise UserError(f"the {op.kind} operator is not symmetric (relative asymmetry {symmetry:.2e}); the products "
                        "are not second derivatives of one function: is the loss deterministic (no dropout, no "
                        "sampling) and twice differentiable?")
    twin = op if op.dtype == torch.float64 else op.with_dtype(torch.float64)
    diff = _differences(twin, v, Hv, op.space.scale, DIFFERENCE_TOL[op.dtype])
    rounding = 0.0
    if twin is not op:
        rounding = _rel(Hv, twin.matvec(v).cpu())
    report = {
        "finite": True,
        "symmetry_rel": symmetry,
        "difference_rel": diff["error"],
        "difference_step": diff["step"],
        "noise_floor": diff["noise_floor"],
        "noise_floor_rel": diff["noise_floor_rel"],
        "difference_ladder": diff["ladder"],
        "rounding_rel": rounding,
        "dtype": DTYPES[op.dtype],
        "mode": op.mode,
        "tolerances": {"symmetry": SYMMETRY_TOL[op.dtype], "difference": diff["tolerance"]},
        "seed": seed,
    }
    if not math.isfinite(diff["error"]) or diff["error"] > diff["tolerance"]:
        floor = diff["noise_floor_rel"]
        noisy = floor is not None and floor > FLOAT64_FLOOR
        where = (f"the gradient's rounding noise ({floor:.1e} relative: float32 arithmetic inside the model) is "
                 "allowed for" if noisy else "the gradient is smooth to float64 rounding")
        cause = (f"{where}, so the products are not its derivative: is the loss twice differentiable through every "
                 "op (fused kernels such as flash attention or fused norms have no double backward), and is it the "
                 "function the operator differentiates (loss_fn, batches)?")
        raise UserError(f"the {op.kind} products disagree with differences of the gradient (relative error "
                        f"{diff['error']:.2e} at step {diff['step']:.1e}, tolerance {diff['tolerance']:.1e}, "
                        f"{report['dtype']}, mode {op.mode}): {cause}")
    return report
