"""ParamHessian and GaussNewton against independent float64 references; the operator contract; bad input."""

import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from operator_refs import (
    ARCHS,
    confirmed_dense_hessian,
    flat_mlp_loss,
    flat_param_loss,
    layernorm_mlp,
    mlp_loss,
    reference_products,
    rel,
    tiny_gpt,
    token_batches,
)
from scipy.sparse.linalg import eigsh

from hessian_tools.errors import UserError
from hessian_tools.operators import ActivationHessian, GaussNewton, ParamHessian

# float64 products from different autodiff paths agree to rounding; 1e-9 leaves room for n ~ 5000 sums.
TOL = 1e-9


def random_matrix(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_param_hessian_layernorm_mlp_equals_dense_reference():
    model, batch = layernorm_mlp()
    f, theta = flat_mlp_loss(model, batch)
    H = confirmed_dense_hessian(f, theta)
    op = ParamHessian(model, [batch], loss_fn=mlp_loss, mode="rev-rev", chunk=None)
    assert op.shape == (63, 63) and op.dtype == torch.float64
    assert rel(op.matmat(torch.eye(63, dtype=torch.float64)), H) < TOL
    v = random_matrix(63, 1)[:, 0]
    assert rel(op.matvec(v), H @ v) < TOL
    assert rel(op @ v, H @ v) < TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_param_hessian_tiny_gpt_all_params(arch):
    model, batches = tiny_gpt(arch), token_batches()
    names = [n for n, _ in model.named_parameters()]
    f, theta = flat_param_loss(model, batches, names)
    op = ParamHessian(model, batches, mode="rev-rev")
    assert op.shape == (theta.numel(),) * 2
    V = random_matrix(theta.numel(), 3)
    assert rel(op.matmat(V), reference_products(f, theta, V)) < TOL


@pytest.mark.parametrize(
    "arch, params",
    [("gpt2", r"h\.0\.(ln_1|attn\.c_attn\.bias)"), ("simplegpt", r"layers\.0\.attention\.snq"), ("llama2", r"norm")],
)
def test_param_hessian_regex_subset_equals_dense_reference(arch, params):
    model, batches = tiny_gpt(arch), token_batches((2, 1))
    op = ParamHessian(model, batches, params=params, mode="rev-rev")
    names = op.settings()["param_names"]
    assert names == [n for n, _ in model.named_parameters() if re.search(params, n)]
    f, theta = flat_param_loss(model, batches, names)
    H = confirmed_dense_hessian(f, theta)
    V = random_matrix(op.shape[0], 4)
    assert rel(op.matmat(V), H @ V) < TOL
    by_name = ParamHessian(model, batches, params=names, mode="rev-rev")
    v = random_matrix(op.shape[0], 1)[:, 0]
    assert rel(by_name.matvec(v), H @ v) < TOL


def test_batches_of_unequal_size_equal_the_concatenated_batch():
    model = tiny_gpt("llama2_qknorm")
    (i1, t1), (i2, t2) = token_batches((3, 1))
    split = ParamHessian(model, [(i1, t1), (i2, t2)], mode="rev-rev")
    joined = ParamHessian(model, [(torch.cat([i1, i2]), torch.cat([t1, t2]))], mode="rev-rev")
    assert split.settings()["batch_weights"] == pytest.approx([0.75, 0.25])
    V = random_matrix(split.shape[0], 2)
    assert rel(split.matmat(V), joined.matmat(V)) < TOL


def test_batch_weight_callable_overrides_target_count():
    model = tiny_gpt("gpt2")
    batches = token_batches((3, 1))
    equal = ParamHessian(model, batches, mode="rev-rev", batch_weight=lambda batch: 1.0)
    assert equal.settings()["batch_weights"] == [0.5, 0.5] and equal.total_weight == 2.0
    single = [ParamHessian(model, [b], mode="rev-rev") for b in batches]
    v = random_matrix(equal.shape[0], 1)[:, 0]
    assert rel(equal.matvec(v), 0.5 * single[0].matvec(v) + 0.5 * single[1].matvec(v)) < TOL


def dense_gauss_newton(output, x, targets):
    """J^T H J with J = jacfwd(output) (N x V rows) and H = blockdiag(diag(p) - p p^T) / N, all dense."""
    logits = output(x)
    V = logits.shape[-1]
    J = torch.func.jacfwd(output)(x).reshape(-1, V, x.numel())
    p = torch.softmax(logits.reshape(-1, V), -1)
    H = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / p.shape[0]
    return torch.einsum("iak,iab,ibl->kl", J, H, J)


def test_gauss_newton_params_is_psd_and_equals_dense_jt_h_j():
    model, batches = tiny_gpt("gpt2"), token_batches()
    params = r"h\.0\.mlp|ln_f"
    op = GaussNewton(model, batches, params=params, chunk=None)
    names = op.settings()["param_names"]
    named = dict(model.named_parameters())
    shapes = [named[n].shape for n in names]
    idx, targets = batches[0]

    def output(theta):
        parts = theta.split([s.numel() for s in shapes])
        return torch.func.functional_call(model, {n: p.view(s) for n, p, s in zip(names, parts, shapes)}, (idx,))

    theta = torch.cat([named[n].detach().reshape(-1) for n in names])
    G_ref = dense_gauss_newton(output, theta, targets)
    G = op.matmat(torch.eye(op.shape[0], dtype=torch.float64))
    assert rel(G, G_ref) < TOL
    eig = np.linalg.eigvalsh(((G + G.T) / 2).numpy())
    assert eig.min() >= -1e-12 * eig.max() and eig.max() > 0


def test_gauss_newton_activation_site_equals_dense_jt_h_j():
    model, batches = tiny_gpt("simplegpt"), token_batches()
    op = GaussNewton(model, batches, site="layers.0:out", chunk=None)
    idx, targets = batches[0]
    acts = {}
    handle = model.layers[0].register_forward_hook(lambda m, a, out: acts.setdefault("x", out.detach()))
    model(idx)
    handle.remove()
    output = lambda h: model.output(model.norm(h.view(acts["x"].shape)))  # noqa: E731  (the rest of the network)
    G_ref = dense_gauss_newton(output, acts["x"].reshape(-1), targets)
    assert rel(op.matmat(torch.eye(op.shape[0], dtype=torch.float64)), G_ref) < TOL


def test_gauss_newton_at_the_logits_equals_the_hessian():
    """At the logits J = I, so the GGN is the whole Hessian."""
    model, batches = tiny_gpt("llama2"), token_batches((2, 1))
    G = GaussNewton(model, batches, site="output:out")
    H = ActivationHessian(model, batches, site="output:out", mode="rev-rev")
    V = random_matrix(G.shape[0], 3)
    assert rel(G.matmat(V), H.matmat(V)) < TOL


def test_gauss_newton_custom_output_loss_matches_closed_form():
    model, batches = tiny_gpt("gpt2"), token_batches()
    ce = lambda logits, batch: F.cross_entropy(logits.flatten(0, 1), batch[-1].flatten())  # noqa: E731
    closed = GaussNewton(model, batches, params="ln_f")
    generic = GaussNewton(model, batches, params="ln_f", output_loss=ce)
    V = random_matrix(closed.shape[0], 2)
    assert rel(generic.matmat(V), closed.matmat(V)) < TOL


def test_matmat_equals_stacked_matvec_for_every_chunking():
    model, batches = tiny_gpt("simplegpt_gpt2"), token_batches((2, 1))
    V = random_matrix(ParamHessian(model, batches).shape[0], 5)
    for chunk in (None, 2, 1):
        op = ParamHessian(model, batches, mode="rev-rev", chunk=chunk)
        stacked = torch.stack([op.matvec(V[:, j]) for j in range(5)], 1)
        assert rel(op.matmat(V), stacked) < 1e-12


def test_to_scipy_eigsh_matches_dense_eigenvalues():
    model, batch = layernorm_mlp()
    f, theta = flat_mlp_loss(model, batch)
    top = np.linalg.eigvalsh(confirmed_dense_hessian(f, theta).numpy())[-3:]
    op = ParamHessian(model, [batch], loss_fn=mlp_loss, mode="rev-rev")
    lin = op.to_scipy()
    assert lin.shape == (63, 63) and lin.dtype == np.float64
    vals = eigsh(lin, k=3, which="LA", tol=1e-12, return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(vals), top, rtol=1e-9)


def test_hvp_count_counts_vectors():
    model, batches = tiny_gpt("gpt2"), token_batches((1, 1))
    op = ParamHessian(model, batches, params="ln_f", mode="double-backward")
    assert op.hvp_count == 0
    op.matvec(torch.ones(op.shape[0]))
    assert op.hvp_count == 1
    op.matmat(torch.ones(op.shape[0], 4))
    assert op.hvp_count == 5
    op.to_scipy().matvec(np.ones(op.shape[0]))
    assert op.hvp_count == 6


def test_float32_evaluation_and_the_users_model_is_untouched():
    model, batches = tiny_gpt("llama2"), token_batches()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    op32 = ParamHessian(model, batches, dtype=torch.float32, mode="rev-rev")
    op64 = ParamHessian(model, batches, dtype="float64", mode="rev-rev")
    assert op32.dtype == torch.float32 and op32.settings()["dtype"] == "float32"
    v = random_matrix(op32.shape[0], 1, seed=3)[:, 0]
    out = op32.matvec(v)
    assert out.dtype == torch.float64
    assert rel(out, op64.matvec(v)) < 1e-4  # float32 rounding through a one-layer GPT
    assert all(p.dtype == torch.float64 and torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_settings_are_json_serialisable_and_complete():
    import json

    model, batches = tiny_gpt("gpt2"), token_batches((2, 1))
    op = ParamHessian(model, batches, params="ln_f")
    op.matvec(torch.ones(op.shape[0]))
    s = json.loads(json.dumps(op.settings()))
    assert s["kind"] == "params" and s["n"] == op.shape[0] and s["n_batches"] == 2
    assert s["loss_terms_per_batch"] == [12.0, 6.0] and s["mode"] in ("rev-rev", "fwd-rev", "double-backward")
    memory = s["memory"]
    assert memory["terms"] == 2 and memory["budget_bytes"] is None and memory["plan"] == "kept graphs"
    assert 0 < memory["kept_graphs_bytes"] <= memory["measured_peak_bytes"]
    g = json.loads(json.dumps(GaussNewton(model, batches, site="transformer.ln_f:out").settings()))
    assert g["kind"] == "gauss-newton" and g["activation_shapes"] == [[2, 6, 16], [1, 6, 16]]


# ---- bad input ----


def test_empty_batches_are_refused():
    with pytest.raises(UserError, match="no batches"):
        ParamHessian(tiny_gpt("gpt2"), [])


def test_nan_loss_names_the_batch():
    model, batches = tiny_gpt("gpt2"), token_batches((1, 1, 1))
    calls = []

    def loss(model, batch):
        value = F.cross_entropy(model(batch[0]).flatten(0, 1), batch[1].flatten())
        calls.append(None)
        return value * float("nan") if len(calls) == 3 else value

    with pytest.raises(UserError, match="batch 2"):
        ParamHessian(model, batches, loss_fn=loss)


def test_unknown_params_are_refused_with_valid_names():
    with pytest.raises(UserError, match="tok_embeddings.weight"):
        ParamHessian(tiny_gpt("llama2"), token_batches(), params="no_such_param")
    with pytest.raises(UserError, match="unknown parameters"):
        ParamHessian(tiny_gpt("llama2"), token_batches(), params=["norm.weight", "nope"])


def test_unknown_mode_and_dtype_are_refused():
    with pytest.raises(UserError, match="HVP mode"):
        ParamHessian(tiny_gpt("gpt2"), token_batches(), mode="jacrev")
    with pytest.raises(UserError, match="dtype"):
        ParamHessian(tiny_gpt("gpt2"), token_batches(), dtype=torch.float16)


def test_wrong_vector_shape_is_refused():
    op = ParamHessian(tiny_gpt("gpt2"), token_batches(), params="ln_f")
    with pytest.raises(UserError, match="shape"):
        op.matvec(torch.ones(op.shape[0] + 1))
    with pytest.raises(UserError, match="shape"):
        op.matmat(torch.ones(op.shape[0]))


def test_gauss_newton_refuses_site_and_params_together():
    with pytest.raises(UserError, match="not both"):
        GaussNewton(tiny_gpt("gpt2"), token_batches(), site="transformer.ln_f:out", params="ln_f")


def test_train_mode_with_dropout_warns_and_uses_eval():
    model, batches = tiny_gpt("gpt2", dropout=0.5), token_batches()
    model.train()
    with pytest.warns(UserWarning, match="eval mode"):
        op = ParamHessian(model, batches, params="ln_f", mode="rev-rev")
    assert model.training
    reference = ParamHessian(model.eval(), batches, params="ln_f", mode="rev-rev")
    v = random_matrix(op.shape[0], 1)[:, 0]
    assert torch.equal(op.matvec(v), op.matvec(v))  # no dropout noise
    assert rel(op.matvec(v), reference.matvec(v)) < 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ParamHessian(tiny_gpt("gpt2").train(), batches, params="ln_f")  # no dropout: no warning
