"""Sites by role (models.sites.role_sites) perturb what they claim, in every architecture.

The perturbation is the operators' own (SiteProbe adds delta at the site); what it reaches is recorded by hooks of
this test on the block's input and output, both branch outputs, and the input of every map reading a branch.
"""

import pytest
import torch
from operator_refs import ARCHS, rel, tiny_gpt, token_batches

from hessian_tools.errors import UserError
from hessian_tools.operators import ActivationHessian
from hessian_tools.operators.sites import SiteProbe
from models import next_token_loss
from models.sites import ROLES, list_sites, role_site, role_sites

LLAMA = {"attn_in": ("attention.wq", "attention.wk", "attention.wv"), "ffn_in": ("feed_forward.w1", "feed_forward.w3")}
READERS = {  # the maps of block 0 reading each branch's input: q, k, v and the FFN's first maps (gate, up or c_fc)
    "llama2": LLAMA,
    "llama2_qknorm": LLAMA,
    "simplegpt": {"attn_in": ("attention.snq", "attention.snk", "attention.snv"),
                  "ffn_in": ("feed_forward.sn1", "feed_forward.sn3")},
    "gpt2": {"attn_in": ("attn.c_attn",), "ffn_in": ("mlp.c_fc",)},
    "simplegpt_gpt2": {"attn_in": ("attn.c_q", "attn.c_k", "attn.c_v"), "ffn_in": ("mlp.c_fc",)},
}
LAYOUT = {"llama": ("layers.0", "attention", "feed_forward", "layers.1"),  # block 0, its branches, block 1
          "gpt2": ("transformer.h.0", "attn", "mlp", "transformer.h.1")}
EXACT = 1e-12


def traced_forward(model, site, delta, batch):
    """{what: tensor} seen by block 0 when delta is added at `site` (None: the plain forward pass). These hooks
    are registered before the probe's, so at a block's own input or output they see the value before delta."""
    arch = model.config.arch
    block_name, attention, ffn, next_name = LAYOUT["gpt2" if arch in ("gpt2", "simplegpt_gpt2") else "llama"]
    block = model.get_submodule(block_name)
    seen, handles = {}, []

    def keep_input(key):
        return lambda m, args: seen.__setitem__(key, args[0].detach().clone())

    def keep_output(key):
        return lambda m, args, out: seen.__setitem__(key, out.detach().clone())

    handles.append(block.register_forward_pre_hook(keep_input("x")))
    handles.append(block.register_forward_hook(keep_output("out")))
    handles.append(getattr(block, attention).register_forward_hook(keep_output("attn")))
    handles.append(getattr(block, ffn).register_forward_hook(keep_output("ffn")))
    handles.append(model.get_submodule(next_name).register_forward_pre_hook(keep_input("next")))
    for name in READERS[arch]["attn_in"] + READERS[arch]["ffn_in"]:
        module = block.get_submodule(name)
        handles.append(module.register_forward_pre_hook(keep_input(name)))
        handles.append(module.register_forward_hook(keep_output(name + ":out")))
    try:
        with torch.no_grad():
            SiteProbe(model, site).run(next_token_loss, model, batch, delta)
    finally:
        for h in handles:
            h.remove()
    seen["h"] = seen["out"] - seen["ffn"]  # out = h + FFN(...): the residual stream between the branches
    return seen


def same(a, b):
    return rel(a, b) < EXACT


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("role", ROLES)
def test_role_site_perturbs_what_it_claims(arch, role):
    model, (batch,) = tiny_gpt(arch, n_layers=2), token_batches()
    site = role_site(model, role, 0)
    base = traced_forward(model, site, None, batch)
    delta = 0.1 * torch.randn(base["x"].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    hit = traced_forward(model, site, delta, batch)
    readers = READERS[arch]
    if role == "block_in":  # the residual path carries the perturbation (and the branches see it)
        assert same(hit["h"] - hit["attn"], base["x"] + delta)
        if arch.startswith("simplegpt"):  # no pre-norm: q, k, v read the stream itself
            for name in readers["attn_in"]:
                assert same(hit[name], base[name] + delta), name
    elif role == "attn_in":  # every q, k, v map reads exactly input + delta; the residual path does not move
        for name in readers["attn_in"]:
            assert same(hit[name], base[name] + delta), name
        assert same(hit["h"] - hit["attn"], base["x"])
        if arch == "gpt2":  # the fused c_attn: its q, k and v thirds all move
            for third_hit, third_base in zip(hit["attn.c_attn:out"].chunk(3, -1), base["attn.c_attn:out"].chunk(3, -1)):
                assert rel(third_hit, third_base) > 1e-3
    elif role == "ffn_in":  # gate and up (or c_fc) read input + delta; attention and the residual path do not move
        for name in readers["ffn_in"]:
            assert same(hit[name], base[name] + delta), name
        for name in readers["attn_in"]:
            assert same(hit[name], base[name]), name
        assert same(hit["out"] - hit["ffn"], base["h"])
    else:  # block_out: added to the stream leaving the block (nothing inside moves), which the next block reads
        assert same(hit["out"], base["out"]) and same(hit["next"], base["out"] + delta)
    if role != "block_out":
        assert not same(hit["next"], base["next"])  # the perturbation reaches the next block


@pytest.mark.parametrize("arch", ARCHS)
def test_block_output_and_next_block_input_have_one_hessian(arch):
    """layers.0:out and layers.1:in are one tensor read by one downstream: their Hessians are equal."""
    model, batches = tiny_gpt(arch, n_layers=2), token_batches()
    out = ActivationHessian(model, batches, role_site(model, "block_out", 0), mode="rev-rev")
    nxt = ActivationHessian(model, batches, role_site(model, "block_in", 1), mode="rev-rev")
    V = torch.randn(out.shape[0], 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert rel(out.matmat(V), nxt.matmat(V)) < 1e-10
    attn = ActivationHessian(model, batches, role_site(model, "attn_in", 1), mode="rev-rev")
    assert rel(attn.matmat(V), nxt.matmat(V)) > 1e-3  # the branch input is another tensor, whatever the arch


@pytest.mark.parametrize("arch", ARCHS)
def test_role_sites_are_sites_of_every_block(arch):
    model = tiny_gpt(arch, n_layers=2)
    table = role_sites(model)
    assert len(table) == 2 and all(list(row) == list(ROLES) for row in table)
    assert {site for row in table for site in row.values()} <= set(list_sites(model))


def test_bad_role_or_layer_is_one_line_error():
    model = tiny_gpt("llama2", n_layers=2)
    with pytest.raises(UserError, match="unknown site role 'q'; choose one of block_in, attn_in, ffn_in, block_out"):
        role_site(model, "q", 0)
    with pytest.raises(UserError, match="layer 2 is not a block of this model: choose 0 to 1"):
        role_site(model, "attn_in", 2)
    with pytest.raises(UserError, match="site roles are defined for the GPT family"):
        role_sites(torch.nn.Linear(2, 2))
