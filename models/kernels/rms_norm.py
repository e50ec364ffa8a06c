"""Fused RMSNorm: y = w * x / sqrt(mean(x^2) + eps) over the last dimension, twice differentiable.

Kernels, launchers and autograd Functions are shared with LayerNorm (RMSNorm is LayerNorm without centering
and bias) in `models.kernels._norm`, whose docstring derives the backward and double-backward formulas.
"""

import torch

from models.kernels._norm import fused_norm


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm of x (..., N) with optional weight (N,); statistics accumulated in float32 (float64 for float64)."""
    return fused_norm(x, weight, None, eps, centered=False)
