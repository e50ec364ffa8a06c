"""Checks shared by the foreign-checkpoint tests: perturbed random weights, and a loaded checkpoint's AdamW
state against the optimizer that wrote it."""

import torch


def perturbed(model, scale: float = 0.1, seed: int = 1):
    """Add scale * N(0, 1) to every parameter (fresh models have unit norms and zero biases, which would hide a
    mis-mapped tensor); returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model.eval()


def assert_adam_state_of(ckpt, model, opt) -> dict:
    """The checkpoint's optimizer_state() equals `opt`'s state parameter by parameter, for every parameter of
    `model`; returns ckpt.adam_settings() (same keys) for the caller's checks."""
    moments, settings = ckpt.optimizer_state(), ckpt.adam_settings()
    params = dict(model.named_parameters())
    assert moments.keys() == settings.keys() == params.keys()
    for name, p in params.items():
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(moments[name][field], opt.state[p][field]), (name, field)
    return settings
