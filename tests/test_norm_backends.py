"""The "compiled" norm backend: torch.compile only while training with gradients on, the reference otherwise,
so every Hessian tool (eval-mode copies) sees exactly the reference function."""

import torch
from operator_refs import token_batches

from hessian_tools.operators import ParamHessian
from models import GPTConfig, build_model
from models.norms import reference_rms_norm, resolve_backend, rms_norm


def test_compiled_backend_is_the_reference_outside_training():
    x = torch.randn(3, 8)
    assert resolve_backend("compiled", x, training=True) == "compiled"
    assert resolve_backend("compiled", x, training=False) == "torch"
    with torch.no_grad():
        assert resolve_backend("compiled", x, training=True) == "torch"
    w = torch.randn(8)
    assert torch.equal(rms_norm(x, w, 1e-5, "compiled"), reference_rms_norm(x, w, 1e-5))


def test_compiled_models_hessians_equal_the_reference_models():
    batches = token_batches((2,))
    models = {}
    for backend in ("torch", "compiled"):
        torch.manual_seed(0)
        cfg = GPTConfig(arch="simplegpt_gpt2", vocab_size=11, dim=16, n_layers=1, n_heads=2, seq_len=6,
                        ffn_hidden=16, norm_backend=backend)
        models[backend] = build_model(cfg).double().eval()
    v = torch.randn(sum(p.numel() for p in models["torch"].parameters()), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    ref, got = (ParamHessian(models[b], batches, mode="double-backward").matvec(v) for b in ("torch", "compiled"))
    assert torch.equal(ref, got)
