"""Padded targets and third-party models through the Python API (issue 13, classes 8 and 9).

Padding: targets of -100 are not loss terms; the operators must be the Hessian (and Gauss-Newton matrix) of the
mean loss over the loss terms of the union of the batches, micro-batches included. References are built here:
the union's loss summed over its valid targets, divided by their count, differentiated densely; the GGN as
J^T H_z J from an explicit Jacobian of the logits. Hugging Face: tiny GPT2LMHeadModel / LlamaForCausalLM built
in the test (no download), measured with the default loss on HF-style mapping batches against HF's own loss.
"""

import pytest
import torch
import torch.nn.functional as F
from operator_refs import confirmed_dense_hessian, dense_hessian, tiny_gpt, token_batches

from hessian_tools.errors import UserError
from hessian_tools.operators import ActivationHessian, GaussNewton, ParamHessian, list_sites, self_check
from hessian_tools.operators.self_check import DIFFERENCE_TOL
from models import math_attention

transformers = pytest.importorskip("transformers")
PARAMS = r"^norm\.weight$"  # 16 parameters of the tiny llama2


def padded_batches():
    """Two batches of 2 x 6 targets; the second has one row and a half padded (targets -100)."""
    a, b = token_batches((2, 2), seed=3)
    targets = b[1].clone()
    targets[0, 3:] = -100
    targets[1, :] = -100
    return [a, (b[0], targets)]


def union_loss(model, batches, names):
    """theta -> mean cross-entropy over the valid targets of the union (an independent reference)."""
    named = dict(model.named_parameters())
    shapes = [named[n].shape for n in names]
    total = sum(int((b[1] != -100).sum()) for b in batches)

    def f(theta):
        params = {n: p.view(s) for n, p, s in zip(names, theta.split([s.numel() for s in shapes]), shapes)}
        with math_attention():
            return sum(F.cross_entropy(torch.func.functional_call(model, params, (idx,)).flatten(0, 1),
                                       tgt.flatten(), ignore_index=-100, reduction="sum") for idx, tgt in batches) / total

    return f, torch.cat([named[n].detach().reshape(-1) for n in names])


def dense(op):
    return op.matmat(torch.eye(op.shape[0], dtype=torch.float64))


def micro_batched(op, rows=1):
    """The operator's products term by term over micro-batches of `rows` rows (as the memory plan makes them)."""
    op._terms = [[t, op._engine(t, op.mode, False), None] for b in range(len(op.batches)) for t in op.terms_of(b, rows)]
    return op


def test_padded_targets_are_not_loss_terms():
    model, batches = tiny_gpt("llama2"), padded_batches()
    f, theta = union_loss(model, batches, ["norm.weight"])
    want = confirmed_dense_hessian(f, theta)
    for op in (ParamHessian(model, batches, params=PARAMS, dtype=torch.float64),
               micro_batched(ParamHessian(model, batches, params=PARAMS, dtype=torch.float64))):
        assert op.loss_terms == [12.0, 3.0]
        torch.testing.assert_close(dense(op), want, rtol=1e-9, atol=1e-12)
    # the old weighting by numel (12 and 12) is the wrong matrix, by far more than the tolerance
    wrong = ParamHessian(model, batches, params=PARAMS, dtype=torch.float64, batch_weight=lambda b: b[-1].numel())
    assert (dense(wrong) - want).norm() > 0.1 * want.norm()


def test_a_fully_padded_batch_is_refused_and_padded_rows_skipped():
    model, (a, b) = tiny_gpt("llama2"), padded_batches()
    with pytest.raises(UserError, match="all its targets are the ignore index -100"):
        ParamHessian(model, [a, (b[0][1:], b[1][1:])], params=PARAMS)
    op = ParamHessian(model, [a, b], params=PARAMS, dtype=torch.float64)
    assert [t.rows for t in op.terms_of(1, 1)] == [(0, 1)]  # row 1 has no loss term


def logits_jacobian_ggn(model, batches, names):
    """J^T H_z J of the union's mean loss: J from torch.autograd.functional.jacobian of all logits."""
    named = dict(model.named_parameters())
    shapes = [named[n].shape for n in names]
    theta = torch.cat([named[n].detach().reshape(-1) for n in names])
    total = sum(int((b[1] != -100).sum()) for b in batches)

    def logits(th):
        params = {n: p.view(s) for n, p, s in zip(names, th.split([s.numel() for s in shapes]), shapes)}
        with math_attention():
            return torch.cat([torch.func.functional_call(model, params, (idx,)).flatten(0, 1) for idx, _ in batches])

    z = logits(theta).detach()
    J = torch.autograd.functional.jacobian(logits, theta).reshape(z.numel(), -1)
    valid = torch.cat([t.flatten() for _, t in batches]) != -100
    p = torch.softmax(z, -1)
    blocks = [(torch.diag(pi) - torch.outer(pi, pi)) * ok / total for pi, ok in zip(p, valid)]
    return J.T @ torch.block_diag(*blocks) @ J


def test_gauss_newton_counts_the_same_loss_terms():
    model, batches = tiny_gpt("llama2"), padded_batches()
    want = logits_jacobian_ggn(model, batches, ["norm.weight"])
    for op in (GaussNewton(model, batches, params=PARAMS, dtype=torch.float64),
               micro_batched(GaussNewton(model, batches, params=PARAMS, dtype=torch.float64))):
        torch.testing.assert_close(dense(op), want, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------- Hugging Face


def hf_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=23, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(config).double().eval()


def hf_gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=23, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).double().eval()


def hf_batches(seed=5):
    """Two mapping batches in Hugging Face's convention; padding at the ends: attention_mask 0, labels -100."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for rows, pad in ((2, 0), (3, 2)):
        ids = torch.randint(0, 23, (rows, 7), generator=gen)
        mask = torch.ones_like(ids)
        mask[-1, 7 - pad:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def hf_union_loss(model, batches, names):
    """theta -> the union's mean loss from Hugging Face's own loss (its shift, its -100): counts times means."""
    named = dict(model.named_parameters())
    shapes = [named[n].shape for n in names]
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]

    def f(theta):
        params = {n: p.view(s) for n, p, s in zip(names, theta.split([s.numel() for s in shapes]), shapes)}
        with math_attention():
            losses = [torch.func.functional_call(model, params, (), b).loss for b in batches]
        return sum(c * loss for c, loss in zip(counts, losses)) / sum(counts)

    return f, torch.cat([named[n].detach().reshape(-1) for n in names])


@pytest.mark.parametrize("build, param", [(hf_gpt2, "transformer.ln_f.weight"), (hf_llama, "model.norm.weight")])
def test_default_loss_on_hugging_face_mapping_batches(build, param):
    model, batches = build(), hf_batches()
    f, theta = hf_union_loss(model, batches, [param])
    want = dense_hessian(f, theta)[0]
    op = ParamHessian(model, batches, params=f"^{param}$", dtype=torch.float64)
    assert op.loss_terms == [12.0, 16.0]  # 2 x 6 and 3 x 6 shifted labels, 2 padded
    torch.testing.assert_close(dense(op), want, rtol=1e-7, atol=1e-10)
    tuples = [(b["input_ids"][:, :-1], b["labels"][:, 1:]) for b in batches]  # the tuple convention, no mask
    op = ParamHessian(model, tuples, params=f"^{param}$", dtype=torch.float64)
    assert op.shape == (16, 16) and torch.isfinite(dense(op)).all()


def test_gauss_newton_default_output_understands_logits():
    model, batches = hf_llama(), hf_batches()
    ggn = GaussNewton(model, batches, params=r"^lm_head\.", dtype=torch.float64)
    hessian = ParamHessian(model, batches, params=r"^lm_head\.", dtype=torch.float64)
    v = torch.randn(ggn.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(ggn.matvec(v), hessian.matvec(v), rtol=1e-6, atol=1e-9)  # logits linear in lm_head


@pytest.mark.parametrize("build, tuple_site", [(hf_gpt2, "transformer.h.0.attn:out"),
                                               (hf_llama, "model.layers.0.self_attn:out")])
def test_list_sites_lists_only_usable_sites(build, tuple_site):
    model, batches = build(), hf_batches()[:1]
    sites = list_sites(model)
    assert tuple_site not in sites and len(sites) > 20
    for site in sites:
        op = ActivationHessian(model, batches, site, dtype=torch.float64)
        assert torch.isfinite(op.matvec(torch.ones(op.shape[0], dtype=torch.float64))).all(), site
    with pytest.raises(UserError, match="carries tuple"):
        ActivationHessian(model, batches, tuple_site, dtype=torch.float64)


class OnePercentOff(ParamHessian):
    def _matvec(self, v):
        return 1.01 * super()._matvec(v)


def test_self_check_adapts_to_the_noise_floor_of_float32_inside_the_model():
    model, batches = hf_llama(), hf_batches()
    report = self_check(ParamHessian(model, batches, dtype=torch.float64))
    first_step_error = report["difference_ladder"][0][1]
    assert first_step_error > DIFFERENCE_TOL[torch.float64]  # the fixed step alone would refuse a correct operator
    assert report["noise_floor_rel"] > 1e-9 and report["difference_step"] > report["difference_ladder"][0][0]
    assert report["difference_rel"] < report["tolerances"]["difference"] < 5e-3
    with pytest.raises(UserError, match="float32 arithmetic inside the model\\) is allowed for, so the products"):
        self_check(OnePercentOff(model, batches, dtype=torch.float64))
