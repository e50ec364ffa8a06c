"""LayerScaled, ElementwiseScaled, AdamPreconditioned and ScaleFree against dense float64 references.

The references are the dense Hessians of operator_refs (jvp of grad, confirmed by central differences) with
the diagonal built here from its definition: rms of each tensor, |w|, Adam's denominator as PyTorch's AdamW
applies it (checked on a real update), the mean square of the site's activation recorded by a hook of the test.
"""

import numpy as np
import pytest
import torch
from operator_refs import confirmed_dense_hessian, flat_param_loss, rel, site_loss, tiny_gpt, token_batches

from hessian_tools.errors import UserError
from hessian_tools.estimators import lanczos
from hessian_tools.operators import (
    SCALINGS,
    ActivationHessian,
    AdamPreconditioned,
    AdamState,
    ElementwiseScaled,
    LayerScaled,
    ParamHessian,
    ScaleFree,
)
from models import math_attention, next_token_loss

TOL = 1e-9
SUBSETS = {"gpt2": r"h\.0\.(ln_1|attn\.c_attn)", "simplegpt": r"layers\.0\.attention\.(snq|snk)", "llama2": r"norm|w1"}


def random_matrix(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def dense_subset(model, batches, pattern):
    op = ParamHessian(model, batches, params=pattern, mode="rev-rev")
    names = op.settings()["param_names"]
    f, theta = flat_param_loss(model, batches, names)
    named = dict(model.named_parameters())
    return op, names, named, confirmed_dense_hessian(f, theta)


@pytest.mark.parametrize("arch", sorted(SUBSETS))
def test_layer_and_elementwise_scaling_equal_dense_reference(arch):
    model, batches = tiny_gpt(arch), token_batches((2, 1))
    op, names, named, H = dense_subset(model, batches, SUBSETS[arch])
    rms = torch.cat([torch.full((named[n].numel(),), float(named[n].detach().pow(2).mean().sqrt()),
                                dtype=torch.float64) for n in names])
    absw = torch.cat([named[n].detach().reshape(-1).abs() for n in names])
    V = random_matrix(op.shape[0], 3)
    for scaled, d in ((LayerScaled(op), rms), (ElementwiseScaled(op), absw)):
        reference = d[:, None] * H * d[None, :]
        assert scaled.shape == op.shape and scaled.dtype == torch.float64
        assert rel(scaled.matmat(V), reference @ V) < TOL
        assert rel(scaled.matvec(V[:, 0]), reference @ V[:, 0]) < TOL
        assert rel(torch.from_numpy(scaled.to_scipy() @ V.numpy()), reference @ V) < TOL
        top = lanczos(scaled, k=1, tol=1e-10)
        assert top.value == pytest.approx(float(torch.linalg.eigvalsh(reference)[-1]), rel=1e-8)
        settings = scaled.settings()
        assert settings["kind"] == "params" and settings["scaled"] == scaled.scaled
        assert settings["param_names"] == names and "convention" in settings["scaling"]
    assert LayerScaled(op).settings()["scaling"]["tensor_rms"] == pytest.approx(
        {n: float(named[n].detach().pow(2).mean().sqrt()) for n in names})
    if arch == "gpt2":  # c_attn.bias and ln_1.bias start at 0: zero rows and columns, counted
        assert ElementwiseScaled(op).settings()["scaling"]["zero_entries"] == 3 * 16 + 16
    assert op.settings()["scaled"] == "none"


def adam_steps(model, batches, steps=4, lr=1e-2):
    """AdamW (no weight decay) on the batches: (optimizer, parameters before and after the last update)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for _ in range(steps):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        with math_attention():
            sum(next_token_loss(model, b) for b in batches).backward()
        opt.step()
    return opt, before, [p.detach().clone() for p in model.parameters()]


def test_adam_preconditioned_equals_dense_reference_and_adamw_denominator():
    model, batches = tiny_gpt("simplegpt"), token_batches((2, 1))
    opt, before, after = adam_steps(model, batches)
    names = [n for n, _ in model.named_parameters()]
    params = dict(zip(names, model.parameters()))
    state = AdamState({n: opt.state[p]["exp_avg_sq"] for n, p in params.items()},
                      {n: int(opt.state[p]["step"]) for n, p in params.items()}, 0.9, 0.95, 1e-8)
    # the convention is AdamW's own: its last update was -lr / (1 - beta1^t) * m / P exactly
    for name, b, a in zip(names, before, after):
        m, t = opt.state[params[name]]["exp_avg"], state.steps[name]
        update = -1e-2 / (1 - 0.9**t) * m / state.denominator(name)
        assert torch.allclose(a - b, update, rtol=1e-10, atol=1e-14), name
    op, subset, named, H = dense_subset(model, batches, SUBSETS["simplegpt"])
    P = torch.cat([(opt.state[params[n]]["exp_avg_sq"] / (1 - 0.95**4)).sqrt().reshape(-1) + 1e-8 for n in subset])
    pre = AdamPreconditioned(op, state)
    reference = H / P.sqrt()[:, None] / P.sqrt()[None, :]
    V = random_matrix(op.shape[0], 3)
    assert rel(pre.matmat(V), reference @ V) < TOL
    # its top eigenvalue is lambda_max(P^-1 H), from a dense non-symmetric eigensolve
    eig = np.linalg.eigvals((H / P[:, None]).numpy())
    assert np.abs(eig.imag).max() < 1e-8 * np.abs(eig).max()
    assert lanczos(pre, k=1, tol=1e-10).value == pytest.approx(eig.real.max(), rel=1e-8)
    scaling = pre.settings()["scaling"]
    assert pre.settings()["scaled"] == "adam" and scaling["steps"] == [4] and scaling["beta2"] == 0.95


def test_adam_state_without_a_parameter_is_one_line_error():
    model, batches = tiny_gpt("llama2"), token_batches()
    op = ParamHessian(model, batches, params=r"norm")
    state = AdamState({}, {}, 0.9, 0.95, 1e-8)
    with pytest.raises(UserError, match="no second moment for parameter 'layers.0.attention_norm.weight'"):
        AdamPreconditioned(op, state)


def site_activation(model, batches, site):
    name, end = site.rsplit(":", 1)
    seen = []
    module = model.get_submodule(name)
    if end == "in":
        handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    else:
        handle = module.register_forward_hook(lambda m, args, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            for b in batches:
                model(b[0])
    finally:
        handle.remove()
    return torch.cat([a.reshape(-1) for a in seen])


@pytest.mark.parametrize("arch, site", [("llama2", "layers.0.attention:in"), ("gpt2", "transformer.h.0:out")])
def test_scale_free_equals_mean_square_times_dense_reference(arch, site):
    model, batches = tiny_gpt(arch), token_batches((2, 1))
    ms = float(site_activation(model, batches, site).pow(2).mean())  # over every entry of both batches
    both = ActivationHessian(model, batches, site, mode="rev-rev")
    assert both.settings()["activation_mean_square"] == pytest.approx(ms, rel=1e-12)
    f, a, handle = site_loss(model, batches[0], site)  # the dense reference on batch 0
    try:
        H = confirmed_dense_hessian(f, a)
    finally:
        handle.remove()
    scaled = ScaleFree(ActivationHessian(model, batches[:1], site, mode="rev-rev"))
    ms0 = float(site_activation(model, batches[:1], site).pow(2).mean())
    V = random_matrix(a.numel(), 3)
    assert rel(scaled.matmat(V), ms0 * H @ V) < TOL
    assert scaled.settings()["scaling"]["mean_square"] == pytest.approx(ms0, rel=1e-12)
    assert scaled.settings()["scaled"] == "scale-free" and scaled.settings()["site"] == site


def test_scalings_refuse_the_wrong_space():
    model, batches = tiny_gpt("llama2"), token_batches()
    act = ActivationHessian(model, batches, "layers.0:in")
    params = ParamHessian(model, batches, params="norm")
    for cls in (LayerScaled, ElementwiseScaled):
        with pytest.raises(UserError, match="rescales parameter coordinates"):
            cls(act)
    with pytest.raises(UserError, match="wrap an activation-space operator"):
        ScaleFree(params)
    assert set(SCALINGS) == {"layer", "elementwise", "adam", "scale-free"}


def test_float32_products_keep_the_float64_scaling():
    model, batches = tiny_gpt("simplegpt"), token_batches()
    op64 = ParamHessian(model, batches, params=SUBSETS["simplegpt"], mode="rev-rev")
    op32 = ParamHessian(model, batches, params=SUBSETS["simplegpt"], mode="rev-rev", dtype=torch.float32)
    v = random_matrix(op64.shape[0], 1)[:, 0]
    s32 = LayerScaled(op32)
    assert s32.dtype == torch.float32 and s32.with_dtype(torch.float64).dtype == torch.float64
    assert rel(s32.matvec(v), LayerScaled(op64).matvec(v)) < 1e-5
    assert rel(s32.with_dtype(torch.float64).matvec(v), LayerScaled(op64).matvec(v)) < 1e-6
