"""The estimators on the real operators of the five GPT variants, against dense float64 Hessians.

References: dense Hessians by jacfwd(grad(f)) of the test's own flat loss (operator_refs), confirmed by central
differences of the gradient, then numpy.linalg.eigvalsh; nothing here shares code with the operators.
"""

import numpy as np
import pytest
import torch
from operator_refs import ARCHS, confirmed_dense_hessian, flat_param_loss, tiny_gpt, token_batches
from test_sites import site_loss

from hessian_tools.estimators import hutchinson_trace, lanczos
from hessian_tools.operators import ActivationHessian, ParamHessian


def assert_extremes_match(op, H):
    exact = np.linalg.eigvalsh(H.numpy())
    scale = np.abs(exact).max()
    est = lanczos(op, k=1, which="both", tol=1e-10, max_iter=op.shape[0])
    assert est.converged
    values = est.payload["eigenvalues"]
    assert abs(max(values) - exact[-1]) <= 1e-8 * scale
    assert abs(min(values) - exact[0]) <= 1e-8 * scale
    return exact


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_hessian_extremes_and_trace(arch):
    model, batches = tiny_gpt(arch), token_batches(sizes=(2, 1))
    names = [n for n, _ in model.named_parameters()]
    f, theta = flat_param_loss(model, batches, names)
    H = confirmed_dense_hessian(f, theta)
    op = ParamHessian(model, batches, dtype=torch.float64, mode="rev-rev")
    exact = assert_extremes_match(op, H)
    trace = hutchinson_trace(op, n_samples=30, seed=0)
    assert abs(trace.value - exact.sum()) <= 4 * trace.error  # 4 standard errors: fails with p < 1e-4


@pytest.mark.parametrize("arch, site", [("simplegpt", "layers.0.attention.snq:in"), ("gpt2", "transformer.ln_f:out"),
                                        ("llama2_qknorm", "layers.0.feed_forward:in")])
def test_activation_hessian_extremes(arch, site):
    model, (batch,) = tiny_gpt(arch), token_batches()
    f, a, handle = site_loss(model, batch, site)
    try:
        H = confirmed_dense_hessian(f, a)
    finally:
        handle.remove()
    assert_extremes_match(ActivationHessian(model, [batch], site, dtype=torch.float64, mode="double-backward"), H)
