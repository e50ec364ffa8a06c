"""The guard: finiteness (naming the batch), symmetry and central differences of the gradient."""

import pytest
import torch
import torch.nn.functional as F
from operator_refs import tiny_gpt, token_batches

from hessian_tools.errors import UserError
from hessian_tools.operators import ActivationHessian, GaussNewton, ParamHessian, self_check


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_self_check_passes_on_correct_operators(dtype):
    model, batches = tiny_gpt("gpt2"), token_batches((2, 1))
    ops = [
        ParamHessian(model, batches, dtype=dtype),
        ActivationHessian(model, batches, "transformer.h.0.ln_2:in", dtype=dtype, mode="fwd-rev"),
        GaussNewton(model, batches, params="h.0.mlp", dtype=dtype),
    ]
    for op in ops:
        report = self_check(op, seed=1)
        assert op.hvp_count == 2
        assert report["finite"] and report["dtype"] == ("float64" if dtype == torch.float64 else "float32")
        tight = dtype == torch.float64
        assert report["symmetry_rel"] < (1e-12 if tight else 1e-5)
        assert report["difference_rel"] < (1e-7 if tight else 1e-3)  # eps^(2/3) steps; float32 rounding
        if tight:
            assert report["rounding_rel"] == 0.0
        else:  # float32 products against the float64 twin: rounding of order 1e-7, not zero, not 1e-3
            assert 1e-9 < report["rounding_rel"] < 1e-5


class Scaled(ParamHessian):
    """Symmetric but 10% too large."""

    def _matvec(self, v):
        return 1.1 * super()._matvec(v)


class Skewed(ParamHessian):
    """Adds a non-symmetric rank-one term."""

    def _matvec(self, v):
        a = torch.linspace(0, 1, v.numel(), dtype=v.dtype)
        return super()._matvec(v) + a * v.flip(0).sum()


def test_self_check_catches_a_wrong_operator():
    model, batches = tiny_gpt("simplegpt"), token_batches()
    with pytest.raises(UserError, match="disagree with differences"):
        self_check(Scaled(model, batches, params="layers.0.feed_forward", mode="rev-rev"))
    with pytest.raises(UserError, match="not symmetric"):
        self_check(Skewed(model, batches, params="layers.0.feed_forward", mode="rev-rev"))


def test_self_check_names_the_batch_with_a_non_finite_product():
    model, batches = tiny_gpt("gpt2"), token_batches((2, 1, 2))

    def loss(model, batch):
        value = F.cross_entropy(model(batch[0]).flatten(0, 1), batch[1].flatten())
        if batch[0].shape[0] == 1:  # batch 1: finite loss, but sqrt(|w - 1|^2) has no derivative at w = 1
            value = value + torch.sqrt((model.transformer.ln_f.weight - 1).pow(2).sum())
        return value

    op = ParamHessian(model, batches, loss_fn=loss, params="ln_f", mode="rev-rev")
    with pytest.raises(UserError, match="not finite on batch 1"):
        self_check(op)
