"""Fused LayerNorm: y = w * (x - mean) / sqrt(var + eps) + b over the last dimension, twice differentiable.

Kernels, launchers and autograd Functions are shared with RMSNorm in `models.kernels._norm`, whose docstring
derives the backward and double-backward formulas.
"""

import torch

from models.kernels._norm import fused_norm


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm of x (..., N) with optional weight and bias (N,); biased variance, like F.layer_norm."""
    return fused_norm(x, weight, bias, eps, centered=True)
