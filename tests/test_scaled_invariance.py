"""Function-preserving reparametrizations move the raw Hessian and leave the rescaled measures unchanged.

1. Every SimpleNorm weight of a trained simplegpt times 2: the loss is unchanged, the raw lambda_max falls
   about 4x, the layer-scaled and elementwise-scaled lambda_max move by less than their error bars (norm
   eps = 0, where SimpleNorm is exactly scale-invariant) or by less than the eps effect (eps = 1e-5).
2. Per-tensor rescalings that preserve a pre-norm model's function (a norm gain times c with the maps
   reading it over c; SwiGLU's up map times c with the down map over c): S H S and diag|w| H diag|w| are the
   same matrices, H is not.
3. The residual stream of a pre-norm model times c (embeddings and every branch's output map times c): the
   activation Hessian at the stream falls as 1/c^2, the scale-free one (ms * H) does not move.
"""

import copy

import pytest
import torch
from operator_refs import rel, tiny_gpt, token_batches

from hessian_tools.estimators import lanczos
from hessian_tools.operators import ActivationHessian, ElementwiseScaled, LayerScaled, ParamHessian, ScaleFree
from models import math_attention, next_token_loss
from models.checkpoint import load_checkpoint
from models.norms import RMSNorm, SimpleNorm
from models.sites import role_site
from models.train import TrainConfig, train

TOL = 1e-10  # Lanczos relative residual tolerance (float64 products)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A simplegpt (dim 16, 2 layers) after 60 AdamW steps of models.train, in float64, and 2 held-out batches."""
    cfg = TrainConfig(arch="simplegpt", dim=16, n_layers=2, n_heads=2, seq_len=16, batch_size=8, steps=60, lr=1e-2,
                      warmup=5, save_every=0, norm_backend="torch", device="cpu")
    run = tmp_path_factory.mktemp("invariance") / "run"
    assert train(cfg, run, progress=False).status == "completed"
    ckpt = load_checkpoint(run)
    return ckpt.model.double(), ckpt.measurement_batches(2, 4)


def with_eps(model, eps):
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, RMSNorm):
            module.eps = eps
    return twin


def simplenorm_weights_times(model, c):
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for module in twin.modules():
            if isinstance(module, SimpleNorm):
                module.lin.weight.mul_(c)
    return twin


def mean_loss(model, batches):
    with torch.no_grad(), math_attention():
        return sum(next_token_loss(model, b).item() for b in batches) / len(batches)


def top(op):
    est = lanczos(op, k=1, which="largest", tol=TOL)
    assert est.converged
    return est


def eps_effect(model, batches):
    """max over SimpleNorm layers and tokens of eps / mean(z^2), z = W x the normalized vector."""
    worst, handles = [0.0], []
    for module in model.modules():
        if isinstance(module, SimpleNorm):
            eps = module.norm.eps
            handles.append(module.lin.register_forward_hook(
                lambda m, args, z, eps=eps: worst.append(eps / float(z.pow(2).mean(-1).min()))))
    try:
        mean_loss(model, batches)
    finally:
        for h in handles:
            h.remove()
    return max(worst)


def measures(model, batches):
    op = ParamHessian(model, batches, dtype=torch.float64, mode="rev-rev")
    return {"raw": top(op), "layer": top(LayerScaled(op)), "elementwise": top(ElementwiseScaled(op))}


def test_simplenorm_weights_times_two_move_raw_sharpness_4x_and_not_the_scaled_ones(trained):
    model, batches = trained
    exact = with_eps(model, 0.0)
    doubled = simplenorm_weights_times(exact, 2.0)
    assert mean_loss(doubled, batches) == pytest.approx(mean_loss(exact, batches), rel=1e-13)
    before, after = measures(exact, batches), measures(doubled, batches)
    assert 3.5 < before["raw"].value / after["raw"].value < 4.5  # measured 3.86
    for name in ("layer", "elementwise"):
        a, b = before[name], after[name]
        assert abs(a.value - b.value) <= a.error + b.error, (name, a.value, b.value, a.error, b.error)


def test_with_norm_eps_the_scaled_sharpness_moves_by_less_than_the_eps_effect(trained):
    """eps = 1e-5 breaks scale invariance by O(eps / mean(z^2)): the layer-scaled lambda_max moved by 0.33 of
    that (relative) when measured; the raw one by 4x."""
    model, batches = trained
    doubled = simplenorm_weights_times(model, 2.0)
    effect = eps_effect(model, batches)
    assert 0 < effect < 1e-2
    assert mean_loss(doubled, batches) == pytest.approx(mean_loss(model, batches), rel=effect)
    before, after = measures(model, batches), measures(doubled, batches)
    assert before["raw"].value / after["raw"].value > 3.5
    for name in ("layer", "elementwise"):
        assert abs(before[name].value - after[name].value) <= effect * before[name].value, name


def prenorm_rescaled(model, gain=3.0, up=2.0):
    """llama2: attention_norm gain times `gain`, wq, wk, wv over it; w3 (up) times `up`, w2 (down) over it."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for block in twin.layers:
            block.attention_norm.weight.mul_(gain)
            for lin in (block.attention.wq, block.attention.wk, block.attention.wv):
                lin.weight.div_(gain)
            block.feed_forward.w3.weight.mul_(up)
            block.feed_forward.w2.weight.div_(up)
    return twin


def assert_scaled_unchanged(model, twin, batches, scalings):
    """The raw Hessians of model and twin differ; their rescaled ones are the same matrix (on 3 random columns)."""
    assert mean_loss(twin, batches) == pytest.approx(mean_loss(model, batches), rel=1e-13)
    op, op_twin = (ParamHessian(m, batches, mode="rev-rev") for m in (model, twin))
    V = torch.randn(op.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert rel(op_twin.matmat(V), op.matmat(V)) > 0.1  # the raw Hessian moves
    for cls in scalings:
        assert rel(cls(op_twin).matmat(V), cls(op).matmat(V)) < 1e-10, cls.__name__


def test_per_tensor_rescalings_of_a_prenorm_model_leave_the_scaled_hessians_unchanged():
    model = tiny_gpt("llama2", n_layers=2)
    assert_scaled_unchanged(model, prenorm_rescaled(model), token_batches((2, 1)), (LayerScaled, ElementwiseScaled))


def test_a_different_factor_on_each_simplenorm_weight_leaves_the_scaled_hessians_unchanged():
    """Each SimpleNorm weight is scale-invariant on its own (eps = 0: exactly)."""
    model = with_eps(tiny_gpt("simplegpt", n_layers=2), 0.0)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for i, module in enumerate(m for m in twin.modules() if isinstance(m, SimpleNorm)):
            module.lin.weight.mul_(0.5 + 0.25 * i)
    assert_scaled_unchanged(model, twin, token_batches((2, 1)), (LayerScaled, ElementwiseScaled))


def residual_stream_times(model, c):
    """llama2: embeddings, every wo and every w2 times c: the residual stream is c times as large everywhere and
    every norm reads it scale-free, so (eps = 0) the function is unchanged."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.tok_embeddings.weight.mul_(c)
        for block in twin.layers:
            block.attention.wo.weight.mul_(c)
            block.feed_forward.w2.weight.mul_(c)
    return twin


@pytest.mark.parametrize("role, layer", [("block_in", 1), ("block_out", 0)])
def test_scale_free_activation_measure_is_unchanged_when_the_stream_is_rescaled(role, layer):
    model = with_eps(tiny_gpt("llama2", n_layers=2), 0.0)
    batches = token_batches((2, 1))
    twin = residual_stream_times(model, 2.0)
    assert mean_loss(twin, batches) == pytest.approx(mean_loss(model, batches), rel=1e-13)
    site = role_site(model, role, layer)
    raw, raw_twin = (ActivationHessian(m, batches, site, mode="rev-rev") for m in (model, twin))
    assert raw_twin.settings()["activation_mean_square"] == pytest.approx(
        4 * raw.settings()["activation_mean_square"], rel=1e-12)
    assert top(raw).value / top(raw_twin).value == pytest.approx(4.0, rel=1e-8)
    a, b = top(ScaleFree(raw)), top(ScaleFree(raw_twin))
    assert abs(a.value - b.value) <= a.error + b.error
