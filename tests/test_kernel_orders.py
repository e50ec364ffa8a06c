"""Fused norms under every derivative order the engine and torch.func users reach (issue 14, defects 1 and 2).

References are the torch backend's composite ops in float64 (LayerNorm in elementary ops, since PyTorch's own
F.layer_norm gets mixed jacrev/jacfwd derivatives wrong). Shapes stay tiny: the kernels run in the interpreter.
"""

import pytest
import torch
from kernel_device import generator, on_device, token_batch  # noqa: F401 (on_device: autouse fixture)
from torch.func import grad, hessian, jacfwd, jacrev, jvp

from hessian_tools.operators import MODES, ActivationHessian, ParamHessian
from models import build_model
from models.config import GPTConfig
from models.kernels import _common, layer_norm, rms_norm
from models.norms import rms_norm as ref_rms_norm

EPS = 1e-5
F64 = dict(dtype=torch.float64)
# float64 results of different derivative orders and of the kernels against plain ops differ by rounding only
CLOSE = dict(rtol=1e-9, atol=1e-11)


def plain_layer_norm(x, w=None, b=None):
    """LayerNorm in elementary torch ops, differentiable to any order by every transform."""
    z = x - x.mean(-1, keepdim=True)
    y = z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + EPS)
    return y if w is None else y * w + b


def norm_pair(op: str):
    """(fused f, reference f) with f(x, w, b) (b ignored by RMSNorm)."""
    if op == "rms":
        return (lambda x, w, b: rms_norm(x, w, EPS)), (lambda x, w, b: ref_rms_norm(x, w, EPS))
    return (lambda x, w, b: layer_norm(x, w, b, EPS)), plain_layer_norm


def scalar(f, N):
    """A non-polynomial scalar of the norm output: every derivative order is generically nonzero."""
    c = torch.linspace(-1, 1, N, **F64)
    return lambda x, w, b: (f(x, w, b).sin() * c).sum()


def inputs(N=3, rows=2, seed=0):
    g = generator(seed)
    return tuple(torch.randn(*s, generator=g, **F64) for s in ((rows, N), (N,), (N,)))


# ------------------------------------------------------------------------------- defect 1: batched double backward


@pytest.mark.parametrize("op", ["rms", "ln"])
@pytest.mark.parametrize("affine", [True, False])
def test_batched_double_backward(op, affine):
    """autograd.grad(..., is_grads_batched=True) (PyTorch's legacy vmap) equals a loop over the columns."""
    kern, ref = norm_pair(op)
    x, w, b = inputs(N=5, rows=3)
    if not affine:
        w = b = None
    results = []
    for f in (kern, ref):
        xs = [x.clone().requires_grad_()] + ([w.clone().requires_grad_()] if affine else [])
        y = f(xs[0], xs[1] if affine else None, b)
        grads = torch.autograd.grad((y.sin() * y).sum(), xs, create_graph=True)
        T = [torch.randn(4, *g.shape, generator=generator(3), **F64) for g in grads]
        batched = torch.autograd.grad(grads, xs, T, retain_graph=True, is_grads_batched=True)
        loop = [torch.stack(c) for c in zip(*(torch.autograd.grad(grads, xs, [t[j] for t in T], retain_graph=True)
                                              for j in range(4)))]  # fmt: skip
        for got, want in zip(batched, loop):
            torch.testing.assert_close(got, want, **CLOSE)
        results.append(batched)
    for got, want in zip(*results):
        assert got.abs().max() > 0
        torch.testing.assert_close(got, want, **CLOSE)


def model_pair(arch: str):
    """The same tiny float64 model with the fused ("triton") and the reference ("torch") norms."""
    models = []
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        cfg = GPTConfig(arch=arch, vocab_size=11, dim=8, n_layers=1, n_heads=2, seq_len=4, ffn_hidden=8,
                        norm_backend=backend)
        models.append(build_model(cfg).double().eval())
    return models


OPERATORS = {
    # ParamHessian of nanoGPT and ActivationHessian of Llama2, one layer each: three LayerNorms / RMSNorms
    "params-gpt2": ("gpt2", lambda model, batches, **kw: ParamHessian(model, batches, **kw), "layer_norm"),
    "activation-llama2": ("llama2", lambda model, batches, **kw: ActivationHessian(
        model, batches, "layers.0.attention:out", **kw), "rms_norm"),
}


@pytest.mark.parametrize("case", sorted(OPERATORS))
@pytest.mark.parametrize("mode", MODES)
def test_operator_matmat_through_fused_norms(case, mode):
    """matmat in every mode and chunk size (1: matvecs; 3: vmapped chunks and a remainder; None: all columns at
    once, is_grads_batched in double-backward) equals the torch backend's, and runs the fused double backward."""
    arch, make, kernel = OPERATORS[case]
    fused, reference = model_pair(arch)
    batches = [token_batch(1, 4, 11)]
    want = make(reference, batches, mode=mode, chunk=1)
    V = torch.randn(want.shape[0], 4, generator=generator(0), **F64)
    want = want.matmat(V)
    assert want.abs().max() > 0
    for chunk in (1, 3, None):
        before = _common.LAUNCHES[f"{kernel}.bwd2"]
        got = make(fused, batches, mode=mode, chunk=chunk).matmat(V)
        assert _common.LAUNCHES[f"{kernel}.bwd2"] > before, "the fused double backward did not run"
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=f"chunk={chunk}")


# ------------------------------------------------------------------------------- defect 2: third and fourth orders


def rev(g, x, t):
    """vjp of g at x with cotangent t."""
    return torch.func.vjp(g, x)[1](t)[0]


def fwd(g, x, t):
    """jvp of g at x with tangent t."""
    return jvp(g, (x,), (t,))[1]


def vectors(x):
    """Four fixed directions of x's shape."""
    return torch.cos(x), torch.sin(3 * x), torch.cos(2 * x + 1), torch.sin(x - 2)


def vector_order(*steps):
    """d^k f [t_1, ..., t_{k-1}] in x by the given steps (fwd or rev, innermost first) applied to grad_x f."""

    def compose(f, x, w, b):
        g = lambda x: grad(f)(x, w, b)  # noqa: E731
        for step, t in zip(steps, vectors(x)):
            g = (lambda g, step, t: lambda x: step(g, x, t))(g, step, t)
        return g(x)

    return compose


def autograd_fourth(f, x, w, b):
    """d^4 f [t_1, t_2, t_3] in x by four nested torch.autograd.grad calls (create_graph), no torch.func."""
    x = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(x, w, b), x, create_graph=True)
    for t in vectors(x.detach())[:3]:
        (g,) = torch.autograd.grad((g * t).sum(), x, create_graph=True)
    return g


ARGS = (0, 1)  # dense derivatives in (x, w): x of one row, three features, and a weight
ORDERS = {  # name: composition; vector compositions d^k f[...] in x, dense ones in (x, w)
    "jvp(jvp(grad))": vector_order(fwd, fwd),
    "vjp(jvp(grad))": vector_order(fwd, rev),
    "jvp(vjp(grad))": vector_order(rev, fwd),
    "vjp(vjp(grad))": vector_order(rev, rev),
    "jacfwd(hessian)": lambda f, x, w, b: jacfwd(hessian(f, ARGS), ARGS)(x, w, b),
    "jacfwd(jacrev(jacrev))": lambda f, x, w, b: jacfwd(jacrev(jacrev(f, ARGS), ARGS), ARGS)(x, w, b),
    "jacrev(jacrev(jacrev))": lambda f, x, w, b: jacrev(jacrev(jacrev(f, ARGS), ARGS), ARGS)(x, w, b),
    "jvp(jvp(jvp(grad)))": vector_order(fwd, fwd, fwd),
    "vjp(vjp(jvp(grad)))": vector_order(fwd, rev, rev),
    "vjp(vjp(vjp(grad)))": vector_order(rev, rev, rev),
    "jacfwd(jacfwd(hessian))": lambda f, x, w, b: jacfwd(jacfwd(hessian(f, ARGS), ARGS), ARGS)(x, w, b),
    "autograd.grad x4": autograd_fourth,
}


@pytest.mark.parametrize("order", sorted(ORDERS))
@pytest.mark.parametrize("op", ["rms", "ln"])
def test_higher_orders_match_composite(op, order):
    """Every third and fourth derivative composition equals the composite reference and is nonzero."""
    kern, ref = norm_pair(op)
    compose = ORDERS[order]
    x, w, b = inputs(rows=1)
    leaves = lambda t: torch.cat([a.reshape(-1) for a in torch.utils._pytree.tree_leaves(t)])  # noqa: E731
    got, want = leaves(compose(scalar(kern, 3), x, w, b)), leaves(compose(scalar(ref, 3), x, w, b))
    assert want.abs().max() > 1e-3 and got.abs().max() > 1e-3
    torch.testing.assert_close(got, want, **CLOSE)
