"""Fused Triton norms (RMSNorm, LayerNorm) that support double backward, forward mode and torch.func.

Importing this package imports triton; `models.norms` imports it lazily, only for the "triton" backend.
Kernel launches are counted in `models.kernels._common.LAUNCHES` (by name: "rms_norm.bwd2", ...).
"""

from models.kernels.layer_norm import layer_norm
from models.kernels.rms_norm import rms_norm

__all__ = ["layer_norm", "rms_norm"]
