"""The five variants: build, train, save/reload bit-identically, Hessian-vector products in all three modes."""

import pytest
import torch
from torch.func import functional_call, grad, jvp, vjp

from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import ARCHS, GPTConfig
from models.gpt import build_model, math_attention, next_token_loss
from models.sites import list_sites

VOCAB, SEQ = 24, 8


def tiny(arch: str, **kw) -> GPTConfig:
    return GPTConfig(arch=arch, vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, seq_len=SEQ,
                     norm_backend="torch", **kw)


def batch(seed=0, b=4):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (b, SEQ + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


@pytest.mark.parametrize("arch", ARCHS)
def test_trains_saves_and_reloads_bit_identically(arch, tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny(arch))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = batch()
    losses = []
    for _ in range(8):
        loss = next_token_loss(model, data)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    path = save_checkpoint(tmp_path, 8, model, opt, {"note": "test"})
    ckpt = load_checkpoint(path)
    assert ckpt.step == 8 and ckpt.config == model.config and ckpt.meta["note"] == "test"
    assert not ckpt.model.training
    model.eval()
    idx = data[0]
    assert torch.equal(ckpt.model(idx), model(idx))
    moments = ckpt.adam_second_moments()
    assert moments.keys() == dict(model.named_parameters()).keys()
    for name, p in model.named_parameters():
        assert torch.equal(moments[name], opt.state[p]["exp_avg_sq"])


def loss_fn(model, data):
    return lambda params: next_token_loss(lambda idx: functional_call(model, params, (idx,)), data)


def central_difference(model, data, v: dict, h: float = 1e-4) -> torch.Tensor:
    """Independent reference for H v: the central difference of the gradient along v (O(h^2) error), flat in
    named_parameters() order."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    g = grad(loss_fn(model, data))
    with math_attention():
        plus = g({k: p + h * v[k] for k, p in params.items()})
        minus = g({k: p - h * v[k] for k, p in params.items()})
    return torch.cat([((plus[k] - minus[k]) / (2 * h)).flatten() for k in params])


def hvp_three_ways(model, data, v):
    params = {k: p.detach() for k, p in model.named_parameters()}
    f = loss_fn(model, data)
    with math_attention():
        fwd = jvp(grad(f), (params,), (v,))[1]
        _, pullback = vjp(grad(f), params)
        rev = pullback(v)[0]
        live = dict(model.named_parameters())
        g = torch.autograd.grad(next_token_loss(model, data), list(live.values()), create_graph=True)
        dot = sum((gi * v[k]).sum() for gi, k in zip(g, live))
        dbl = dict(zip(live, torch.autograd.grad(dot, list(live.values()))))
    return fwd, rev, dbl


@pytest.mark.parametrize("arch", ARCHS)
def test_hvp_modes_agree_and_match_finite_differences(arch):
    torch.manual_seed(1)
    model = build_model(tiny(arch)).double()
    data = batch(1, b=2)
    gen = torch.Generator().manual_seed(2)
    v = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in model.named_parameters()}
    scale = torch.cat([t.flatten() for t in v.values()]).norm()
    v = {k: t / scale for k, t in v.items()}  # unit direction, so the difference step is h in parameter space
    fwd, rev, dbl = hvp_three_ways(model, data, v)
    for k in v:
        torch.testing.assert_close(fwd[k], dbl[k], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(rev[k], dbl[k], atol=1e-10, rtol=1e-10)
    fd = central_difference(model, data, v)
    hv = torch.cat([dbl[k].flatten() for k in v])
    assert hv.norm() > 1e-3
    assert (hv - fd).norm() <= 1e-5 * hv.norm()  # truncation error ~ h^2 * third derivative


def test_sites_follow_registration_order_and_skip_containers():
    model = build_model(tiny("gpt2"))
    sites = list_sites(model)
    assert sites[:3] == ["transformer.wte:out", "transformer.wpe:out", "transformer.h.0:in"]
    assert "transformer.h:in" not in sites and "transformer:out" not in sites
    assert not any("drop" in s for s in sites)
    assert sites[-2:] == ["lm_head:in", "lm_head:out"]
    names = [n for n, _ in model.named_modules()]
    order = [names.index(s.rsplit(":", 1)[0]) for s in sites]
    assert order == sorted(order)
    simple = list_sites(build_model(tiny("simplegpt")))
    assert "layers.1.attention.snq.lin:in" in simple and "layers.1.feed_forward.sn2.norm:out" in simple


# Grouped-query attention (2 query heads share 1 key/value head), the reference's whole-vector QK-norm and a tied
# Llama head, through the engine's three product modes.
GQA = {"llama2": dict(n_kv_heads=1), "llama2_qknorm": dict(n_kv_heads=1, qk_norm_scope="all"),
       "simplegpt": dict(n_kv_heads=1, tie_embeddings=True)}


@pytest.mark.parametrize("arch", list(GQA))
def test_gqa_hvp_runs_in_all_three_modes(arch):
    from hessian_tools.operators import MODES, ParamHessian

    torch.manual_seed(3)
    model = build_model(tiny(arch, **GQA[arch])).double()
    k = getattr(model.layers[0].attention, "wk", None) or model.layers[0].attention.snk
    assert k.weight.shape == (8, 16)  # one key head of head_dim 8
    data = batch(4, b=2)
    ops = {mode: ParamHessian(model, [data], dtype=torch.float64, mode=mode) for mode in MODES}
    n = ops["double-backward"].shape[0]
    v = torch.randn(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    v /= v.norm()
    products = {mode: op.matvec(v) for mode, op in ops.items()}
    for mode, hv in products.items():
        assert ops[mode].mode == mode
        torch.testing.assert_close(hv, products["double-backward"], atol=1e-10, rtol=1e-10)
    params = dict(model.named_parameters())
    direction = {k: t.view(p.shape) for (k, p), t in zip(params.items(), v.split([p.numel() for p in params.values()]))}
    fd = central_difference(model, data, direction)
    hv = products["rev-rev"]
    assert hv.norm() > 1e-3 and (hv - fd).norm() <= 1e-5 * hv.norm()
