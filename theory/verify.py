"""verify-bound: the SimpleNorm Hessian bound checked layer by layer on a model and its batches.

For every SimpleNorm layer (models.norms.SimpleNorm) the row holds the measured ||H_xx|| at `NAME:in` with
its Lanczos error (an interval, certified below), the bound of theory/simplenorm.md section 5 from the layer's tensors and the
measured ||H_yy|| at `NAME:out`, the tightness ratio bound / measured, ||C|| / ||GN|| from the closed forms
and a weight-scale check (W -> c W). A baseline's block linear maps get the plain bound ||W||^2 ||H_yy||
and, when a norm feeds them, the pre-norm bound through that norm beside the measured Hessian it bounds (at
the norm's input, along this linear map only: `prenorm_twin`). Hessians are of the weighted mean loss
over the batches, taken in float64; `NAME:in` perturbs the input of this module only (a forward pre-hook),
even when the same tensor also feeds other modules. A bound is violated when measured - error > bound.
"""

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn

from hessian_tools.errors import UserError
from hessian_tools.estimators.lanczos import spectral_norm
from hessian_tools.operators.activation_hessian import ActivationHessian
from hessian_tools.operators.base import CurvatureOperator
from models.gpt import evaluation, math_attention
from models.norms import LayerNorm, RMSNorm, SimpleNorm
from theory import closed_forms as cf

BLOCK_PREFIXES = ("layers.", "transformer.h.")
ROUNDOFF = 1e-10  # relative float64 agreement of two exact computations through tiny models


def float64_copy(model: nn.Module) -> nn.Module:
    """A private float64 copy in eval mode (the caller's model is left as it is)."""
    return copy.deepcopy(model).to(torch.float64).eval()


def site_hessian(model: nn.Module, batches, site: str) -> ActivationHessian:
    """The engine's activation Hessian at `site` in float64 (the one place the measurement backend is chosen)."""
    return ActivationHessian(model, batches, site, dtype=torch.float64, mode="double-backward")


class TokenOperator(CurvatureOperator):
    """A symmetric operator given by a function on (N, k) token-row tensors (closed forms); flat = row-major."""

    kind = "closed-form"

    def __init__(self, fn, rows: int, cols: int, name: str):
        super().__init__(rows * cols, torch.float64, torch.device("cpu"))
        self.fn, self.rows, self.cols, self.name = fn, rows, cols, name

    @property
    def mode(self) -> str:
        return "closed-form"

    def _matvec(self, v):
        return self.fn(v.view(self.rows, self.cols)).reshape(-1)

    def _matmat(self, V):
        return torch.stack([self._matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    def settings(self) -> dict:
        return {"kind": self.kind, "operator": self.name, "n": self.shape[0]}


def module_inputs(model: nn.Module, batches, name: str) -> torch.Tensor:
    """The first positional input of module `name` on every batch, as token rows (N, m), batches concatenated."""
    module, rows = model.get_submodule(name), []
    handle = module.register_forward_pre_hook(lambda _m, args: rows.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    try:
        with torch.no_grad(), math_attention(), evaluation(model):
            for batch in batches:
                model(batch[0])
    finally:
        handle.remove()
    return torch.cat(rows)


def feeding_norms(model: nn.Module, batch) -> dict:
    """{linear name: norm name} for each nn.Linear whose input is the output tensor of an RMSNorm / LayerNorm."""
    outputs, fed, handles = {}, {}, []

    def norm_hook(name):
        def hook(_module, _args, out):
            outputs[id(out)] = (name, out)  # the tensor is kept so that its id is not reused
        return hook

    def linear_hook(name):
        def hook(_module, args):
            fed[name] = outputs.get(id(args[0]), (None,))[0]
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (RMSNorm, LayerNorm)):
            handles.append(module.register_forward_hook(norm_hook(name)))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(linear_hook(name)))
    try:
        with torch.no_grad(), math_attention(), evaluation(model):
            model(batch[0])
    finally:
        for h in handles:
            h.remove()
    return {lin: norm for lin, norm in fed.items() if norm is not None}


class ThroughNorm(nn.Module):
    """lin(norm(x)): a linear map applying its own copy of the norm that feeds it (see `prenorm_twin`)."""

    def __init__(self, norm: nn.Module, lin: nn.Module):
        super().__init__()
        self.norm, self.lin = norm, lin

    def forward(self, x):
        return self.lin(self.norm(x))


def _replace(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def prenorm_twin(model: nn.Module, batch, norm: str) -> nn.Module:
    """A float64 copy computing the same function, in which the norm `norm` is an identity and every linear
    map LIN it feeds is ThroughNorm(copy of the norm, LIN). The site `LIN.norm:in` is then the norm's input x
    as seen along LIN only: its Hessian is that of x -> L(W Norm(x)), what closed_forms.prenorm_bound bounds
    (L the loss as a function of LIN's output, site `LIN.lin:out` = `LIN:out` of the model).
    UserError if the twin's logits differ (the norm's output feeds something other than linear maps)."""
    twin = float64_copy(model)
    fed = [lin for lin, n in feeding_norms(twin, batch).items() if n == norm]
    norm_module = twin.get_submodule(norm)
    for lin in fed:
        _replace(twin, lin, ThroughNorm(copy.deepcopy(norm_module), twin.get_submodule(lin)))
    _replace(twin, norm, nn.Identity())
    with torch.no_grad(), math_attention():
        reference, logits = float64_copy(model)(batch[0]), twin(batch[0])
    if not torch.allclose(logits, reference, rtol=1e-12, atol=1e-12):
        raise UserError(f"the output of {norm} feeds more than the linear maps {fed}: no pre-norm site for it")
    return twin


def bound_layers(model: nn.Module, pattern: str | None = None) -> list[tuple[str, str]]:
    """[(name, "simplenorm" | "linear")]: every SimpleNorm module, or for a model without them every nn.Linear
    inside a block (the baseline's comparable maps); filtered by the regex `pattern` (searched in the name)."""
    simple = [(n, "simplenorm") for n, m in model.named_modules() if isinstance(m, SimpleNorm)]
    layers = simple or [(n, "linear") for n, m in model.named_modules()
                        if isinstance(m, nn.Linear) and n.startswith(BLOCK_PREFIXES)]
    if pattern is not None:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise UserError(f"--layers {pattern!r} is not a valid regular expression ({exc})") from None
        layers = [(n, k) for n, k in layers if regex.search(n)]
        if not layers:
            raise UserError(f"no layer matches --layers {pattern!r}; drop the flag to see every layer")
    if not layers:
        raise UserError("the model has no SimpleNorm layer and no block linear map to check")
    return layers


@dataclass(frozen=True)
class Settings:
    """tol: Lanczos relative tolerance; scale: the factor c of the weight-scale check; seed: Lanczos start vector."""

    tol: float = 1e-6
    scale: float = 2.0
    seed: int = 0


def _norm(op, s: Settings):
    est = spectral_norm(op, tol=s.tol, seed=s.seed)
    if est.status != "ok":
        raise UserError(f"the spectral norm of {op.settings().get('site', op.settings().get('operator'))} failed "
                        f"({est.status}); check the checkpoint for NaN weights")
    return est


def simplenorm_layer(model: nn.Module, batches, name: str) -> cf.SimpleNormLayer:
    """The tensors of SimpleNorm `name` (inputs of every batch as token rows, W, gamma, eps)."""
    module = model.get_submodule(name)
    return cf.SimpleNormLayer(module_inputs(model, batches, name), module.lin.weight.detach(),
                              module.norm.weight.detach(), module.norm.eps)


def simplenorm_parts(model: nn.Module, batches, name: str):
    """(layer tensors, g = dl/dy rows, H_yy operator) of SimpleNorm `name` on the batches (model in float64)."""
    layer = simplenorm_layer(model, batches, name)
    hyy = site_hessian(model, batches, f"{name}:out")
    return layer, hyy.gradient().view(-1, layer.d), hyy


def split_operators(layer: cf.SimpleNormLayer, g: torch.Tensor, hyy) -> tuple:
    """(C, GN) as operators on the layer input: C from its closed form, GN = J^T H_yy J with J, J^T closed
    forms and H_yy the engine's product at the layer output."""
    n, m = layer.x.shape
    c_op = TokenOperator(lambda v: cf.curvature_matvec(layer, g, v), n, m, "C")
    gn_op = TokenOperator(lambda v: cf.vjp(layer, hyy.matvec(cf.jvp(layer, v).reshape(-1)).view(n, -1)), n, m, "GN")
    return c_op, gn_op


def eps_size(layer: cf.SimpleNormLayer) -> float:
    """max_t d eps / s_t^2: the relative size of what eps > 0 changes in the exact identities."""
    return float((layer.d * layer.eps / layer.s.pow(2)).max())


def hxx_norm(model: nn.Module, batches, name: str, s: Settings):
    """The measured ||H_xx|| at `name:in` (an Estimate: value, error with its interval, hvp_count)."""
    return _norm(site_hessian(model, batches, f"{name}:in"), s)


def _scaled_hxx_norm(model, batches, name, weight, s: Settings, norm=None):
    """||H_xx|| at `name:in` with `weight` multiplied by c = s.scale and, given `norm`, its eps by c^2 (both
    restored afterwards)."""
    eps = None if norm is None else norm.eps
    with torch.no_grad():
        weight.mul_(s.scale)
    if norm is not None:
        norm.eps = eps * s.scale**2
    try:
        return hxx_norm(model, batches, name, s)
    finally:
        with torch.no_grad():
            weight.div_(s.scale)
        if norm is not None:
            norm.eps = eps


def _unchanged(scaled, measured) -> tuple[float, bool]:
    """(ratio, ratio == 1 within the two Lanczos error bars, relative, plus ROUNDOFF)."""
    ratio = scaled.value / measured.value
    return ratio, abs(ratio - 1) <= (scaled.error + ratio * measured.error) / measured.value + ROUNDOFF


def _scale_check(model, batches, name, weight, measured, s: Settings, layer: cf.SimpleNormLayer | None = None) -> dict:
    """W -> cW (c = s.scale), eps fixed: ratio = ||H_xx(cW)|| / ||H_xx(W)||; 'invariant' when ratio = 1 within
    the Lanczos error bars plus round-off.

    For a SimpleNorm (`layer` its tensors) W -> cW with eps fixed is the same layer with eps / c^2, so ||H_xx||
    moves by what that change of eps makes (theory/simplenorm.md section 6); the layer's output y_t changes by
    exactly the factor f_t = (1 - t_t (1 - c^-2))^-1/2, t_t = d eps / s_t^2 (eps_output_change = max_t f_t - 1).
    The exact symmetry of the implemented layer is (W, eps) -> (cW, c^2 eps): ratio_exact and 'exact' (= 1
    within error bars and round-off) test it. verdict: 'invariant', 'eps' (the change is eps's alone: the
    exact symmetry holds) or 'changes'."""
    norm = None if layer is None else model.get_submodule(name).norm
    ratio, invariant = _unchanged(_scaled_hxx_norm(model, batches, name, weight, s), measured)
    out = {"c": s.scale, "ratio": ratio, "invariant": invariant}
    if norm is None:
        return {**out, "verdict": "invariant" if invariant else "changes"}
    ratio_exact, exact = _unchanged(_scaled_hxx_norm(model, batches, name, weight, s, norm), measured)
    change = float(cf.output_scale_under_weight_scale(layer, s.scale).max()) - 1
    return {**out, "ratio_exact": ratio_exact, "exact": exact, "eps_output_change": change,
            "verdict": "invariant" if invariant else "eps" if exact else "changes"}


def check_simplenorm(model, batches, name: str, s: Settings) -> dict:
    """One row of verify-bound for a SimpleNorm layer."""
    layer, g, hyy = simplenorm_parts(model, batches, name)
    measured, hyy_est = hxx_norm(model, batches, name, s), _norm(hyy, s)
    factors = cf.simplenorm_bound(layer, g, hyy_est.value + hyy_est.error)
    c_op, gn_op = split_operators(layer, g, hyy)
    c_norm, gn_norm = _norm(c_op, s), _norm(gn_op, s)
    eps_effect = eps_size(layer)
    scale = _scale_check(model, batches, name, model.get_submodule(name).lin.weight, measured, s, layer)
    scale["pass"] = scale["exact"]
    return _row(name, "simplenorm", measured, factors["bound"], c_norm.value / gn_norm.value, scale,
                {**factors, "c_norm": c_norm.value, "gn_norm": gn_norm.value, "hyy_error": hyy_est.error,
                 "eps_effect": eps_effect, "hvp_count": measured.hvp_count + hyy_est.hvp_count + gn_norm.hvp_count})


def prenorm_check(model, batches, name: str, norm: str, g: torch.Tensor, hyy_norm: float, s: Settings) -> dict:
    """The pre-norm bound of linear `name` fed by `norm` (closed_forms.prenorm_bound, from g = dl/dy rows and
    ||H_yy|| at `name:out`) beside the measured Hessian it bounds, at `name.norm:in` of `prenorm_twin`."""
    nm, weight = model.get_submodule(norm), model.get_submodule(name).weight.detach()
    bound = cf.prenorm_bound(module_inputs(model, batches, norm), nm.weight.detach(), nm.eps,
                             isinstance(nm, LayerNorm), weight, g, hyy_norm)
    measured = _norm(site_hessian(prenorm_twin(model, batches[0], norm), batches, f"{name}.norm:in"), s)
    return {"feeding_norm": norm, "prenorm_bound": bound, "prenorm_measured": measured.value,
            "prenorm_measured_error": measured.error,
            "prenorm_violated": is_violated(measured.value, measured.error, bound)}


def check_linear(model, batches, name: str, s: Settings, norm: str | None = None) -> dict:
    """One row for a plain linear map: H_xx = W^T H_yy W exactly, so C = 0; bound ||W||^2 ||H_yy||.
    With `norm` (the norm module feeding it) the pre-norm bound through that norm and the Hessian it bounds
    are added (`prenorm_check`); `violated` then covers both bounds."""
    module = model.get_submodule(name)
    hyy = site_hessian(model, batches, f"{name}:out")
    measured, hyy_est = hxx_norm(model, batches, name, s), _norm(hyy, s)
    hyy_norm = hyy_est.value + hyy_est.error
    bound = cf.linear_bound(module.weight.detach(), hyy_norm)
    extra = {"weight_norm": cf.spectral_norm_2(module.weight.detach()), "hyy_norm": hyy_norm,
             "hyy_error": hyy_est.error, "feeding_norm": None, "prenorm_bound": None, "prenorm_measured": None,
             "prenorm_measured_error": None, "prenorm_violated": False}
    if norm is not None:
        g = hyy.gradient().view(-1, module.weight.shape[0])
        extra.update(prenorm_check(model, batches, name, norm, g, hyy_norm, s))
    scale = _scale_check(model, batches, name, module.weight, measured, s)
    scale["pass"] = None  # nothing to judge: a map followed by a norm (QK-norm) is invariant up to its eps
    row = _row(name, "linear", measured, bound, 0.0, scale, extra)
    row["violated"] = row["violated"] or extra["prenorm_violated"]
    return row


def is_violated(measured: float, error: float, bound: float) -> bool:
    """A bound is violated when the measurement exceeds it by more than its error bar.

    measured, error: a Lanczos spectral norm and its error, the half-width around it that contains the record's
    interval (error_kind "probabilistic"). measured - error is at most that interval's lower end, which is
    certified (interlacing: ||H_xx|| >= |theta|, to the rounding floor), so a violation is never claimed on the
    probabilistic side of the measurement. The bound itself uses ||H_yy|| <= value + error, the upper side of
    its own interval, which fails with probability at most failure_probability (1e-3 by default): a reported
    violation is therefore wrong with at most that probability."""
    return measured - error > bound


def _row(name, kind, measured, bound, c_over_gn, scale, extra) -> dict:
    value, error = measured.value, measured.error
    return {"layer": name, "kind": kind, "measured": value, "measured_error": error,
            "converged": measured.converged, "bound": bound, "ratio": bound / value if value else None,
            "c_over_gn": c_over_gn, "scale_invariance": scale, "violated": is_violated(value, error, bound), **extra}


def verify_bound(model: nn.Module, batches, pattern: str | None = None, settings: Settings = Settings(),
                 progress=None) -> list[dict]:
    """A row per layer (see the module docstring); `progress(name)` is called before each layer."""
    model = float64_copy(model)
    batches = list(batches)
    layers = bound_layers(model, pattern)
    norms = feeding_norms(model, batches[0]) if layers[0][1] == "linear" else {}
    rows = []
    for name, kind in layers:
        if progress is not None:
            progress(name)
        if kind == "simplenorm":
            rows.append(check_simplenorm(model, batches, name, settings))
        else:
            rows.append(check_linear(model, batches, name, settings, norms.get(name)))
    return rows
