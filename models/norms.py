"""Normalization layers with a pluggable implementation (`norm_backend`).

Conventions: the normalization runs over the last dimension; RMSNorm(x) = x / sqrt(mean(x^2) + eps) * weight;
SimpleNorm(x) = RMSNorm(W x), the RMS taken over the whole output vector (all heads together).
The "torch" backend is the reference, twice differentiable under autograd and torch.func; "triton" calls the
fused kernels of `models.kernels`, which are twice differentiable as well. "compiled" is for training on CPU:
while a module is in training mode and gradients are on, its norm runs through `torch.compile` (one fused
kernel forward and one backward, 2-3x faster than the reference per norm; compiling costs seconds per new
shape, so it pays on long runs only); in eval mode, and so under every Hessian tool (they work on eval-mode
copies), it is the reference, because compiled functions have no double backward.
"""

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from hessian_tools.errors import UserError


def resolve_backend(backend: str, x: torch.Tensor, training: bool = False) -> str:
    """The implementation that runs: "auto" -> triton on CUDA, torch elsewhere; "compiled" -> itself only for a
    module in training mode with gradients on, else torch."""
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    if backend == "compiled":
        return "compiled" if training and torch.is_grad_enabled() else "torch"
    if backend == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError("norm_backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 set before triton is "
                        "imported, for testing); use --norm-backend torch or auto on CPU")
    return backend


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, backend: str = "torch",
             training: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension; low-precision inputs are normalized in float32."""
    which = resolve_backend(backend, x, training)
    if which == "triton":
        from models import kernels

        return kernels.rms_norm(x, weight, eps)
    if which == "compiled":
        return _compiled(reference_rms_norm)(x, weight, eps)
    return reference_rms_norm(x, weight, eps)


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The reference: x * rsqrt(mean(x^2) + eps) * weight in plain torch ops."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)
    return out if weight is None else out * weight


def layer_norm(x, weight, bias, eps: float, backend: str = "torch", training: bool = False) -> torch.Tensor:
    """LayerNorm over the last dimension (mean removed, variance normalized, then weight and bias)."""
    which = resolve_backend(backend, x, training)
    if which == "triton":
        from models import kernels

        return kernels.layer_norm(x, weight, bias, eps)
    if which == "compiled":
        return _compiled(F.layer_norm)(x, (x.shape[-1],), weight, bias, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@functools.cache
def _compiled(fn):
    return torch.compile(fn)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, backend: str = "torch"):
        super().__init__()
        self.eps, self.backend = eps, backend
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps, self.backend, self.training)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, bias: bool = True, eps: float = 1e-5, backend: str = "torch"):
        super().__init__()
        self.eps, self.backend = eps, backend
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        return layer_norm(x, self.weight, self.bias, self.eps, self.backend, self.training)


class SimpleNorm(nn.Module):
    """Psi(x) = gamma * sqrt(d) * W x / ||W x||, written as RMSNorm(Linear(x, bias=False)): `lin`, then `norm`."""

    def __init__(self, in_dim: int, out_dim: int, eps: float = 1e-5, backend: str = "torch"):
        super().__init__()
        self.lin = nn.Linear(in_dim, out_dim, bias=False)
        self.norm = RMSNorm(out_dim, eps, backend)

    @property
    def weight(self):
        return self.lin.weight

    def forward(self, x):
        return self.norm(self.lin(x))
