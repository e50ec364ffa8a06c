"""Fused Triton norms (RMSNorm, LayerNorm) that support double backward, forward mode and torch.func.

Importing this package imports triton and registers the ops torch.ops.hessian_tools.norm_forward, norm_backward
and norm_backward2 (what torch.compile sees; their Autograd kernels are the same Functions); `models.norms`
imports it lazily, only for the "triton" backend. Kernel launches are counted in
`models.kernels._common.LAUNCHES` (by name: "rms_norm.bwd2", ...).
"""

from models.kernels.layer_norm import layer_norm
from models.kernels.rms_norm import rms_norm

__all__ = ["layer_norm", "rms_norm"]
