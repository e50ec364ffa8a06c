"""ActivationHessian at named sites against dense references built with a hook of the test's own; site errors."""

import pytest
import torch
from operator_refs import confirmed_dense_hessian, rel, site_loss, tiny_gpt, token_batches
from torch import nn

import hessian_tools
from hessian_tools.errors import UserError
from hessian_tools.operators import ActivationHessian
from models.sites import list_sites

TOL = 1e-9


def test_sites_lists_the_models_sites():
    model = tiny_gpt("gpt2")
    assert hessian_tools.sites(model) == list_sites(model)
    assert "transformer.ln_f:out" in hessian_tools.sites(model)
    assert "transformer.wte:in" not in hessian_tools.sites(model)


@pytest.mark.parametrize(
    "arch, site",
    [
        ("gpt2", "transformer.ln_f:out"),  # a LayerNorm output
        ("gpt2", "transformer.h.0.attn:out"),  # an attention output
        ("simplegpt", "layers.0.attention.snq:in"),  # a SimpleNorm input
        ("simplegpt_gpt2", "transformer.h.0.mlp.c_fc.norm:out"),  # the RMSNorm inside a SimpleNorm
        ("llama2", "layers.0.attention:out"),
        ("llama2_qknorm", "layers.0.attention.q_norm:in"),
    ],
)
def test_activation_hessian_equals_dense_reference(arch, site):
    model, (batch,) = tiny_gpt(arch), token_batches()
    op = ActivationHessian(model, [batch], site, mode="rev-rev")
    f, a, handle = site_loss(model, batch, site)
    try:
        H = confirmed_dense_hessian(f, a)
    finally:
        handle.remove()
    assert op.shape == (a.numel(), a.numel())
    V = torch.randn(a.numel(), 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert rel(op.matmat(V), H @ V) < TOL
    assert rel(op.matvec(V[:, 0]), H @ V[:, 0]) < TOL


def test_activation_hessian_is_block_diagonal_over_batches():
    model, batches = tiny_gpt("simplegpt"), token_batches((2, 1))
    op = ActivationHessian(model, batches, "norm:in", mode="double-backward")
    settings = op.settings()
    assert settings["activation_shapes"] == [[2, 6, 16], [1, 6, 16]] and "block diagonal" in settings["convention"]
    n0 = 2 * 6 * 16
    v = torch.randn(op.shape[0], dtype=torch.float64)
    v[n0:] = 0
    out = op.matvec(v)
    assert torch.all(out[n0:] == 0)
    single = ActivationHessian(model, batches[:1], "norm:in", mode="double-backward")
    assert rel(out[:n0], (2 / 3) * single.matvec(v[:n0])) < TOL  # weight of batch 0: 12 of 18 targets


def test_unknown_site_lists_the_valid_ones():
    with pytest.raises(UserError, match=r"unknown site 'nope:out'; valid sites: .*transformer\.ln_f:out"):
        ActivationHessian(tiny_gpt("gpt2"), token_batches(), "nope:out")
    with pytest.raises(UserError, match="unknown site"):
        ActivationHessian(tiny_gpt("gpt2"), token_batches(), "transformer.wte:in")  # integer ids


class Twice(nn.Module):
    """Applies the same Linear twice, and owns a Linear that the forward pass never uses."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3).double()
        self.unused = nn.Linear(3, 3).double()

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


def squared(model, batch):
    return model(batch[0]).pow(2).mean()


def test_site_whose_module_runs_twice_is_refused():
    batch = (torch.randn(2, 3, dtype=torch.float64), torch.zeros(2))
    with pytest.raises(UserError, match="more than once"):
        ActivationHessian(Twice(), [batch], "lin:out", loss_fn=squared)
    with pytest.raises(UserError, match="not reached"):
        ActivationHessian(Twice(), [batch], "unused:in", loss_fn=squared)
