"""Launch helpers shared by the row-wise norm kernels: layout, chunking, program grid, accumulation dtype,
launch counters and the vmap rule.

Layout convention: a row-wise op sees `x` of shape lead_shape + rest + (N,), normalized over the last dim.
Per-feature tensors (weight, bias and their cotangents) have shape lead_shape + (N,): one vector per group of
rows. Public calls use lead = 0 (one group, one vector of shape (N,)); every vmap level adds one leading group
dimension, so vmapped weights and weight gradients that are sums over rows stay per vmap element.
"""

import collections
import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

MAX_BLOCK = 4096  # widest chunk of a row a program holds at once; wider rows loop over chunks
PROGRAMS_PER_SM = 8  # programs launched per streaming multiprocessor (each loops over a range of rows)
LAUNCHES = collections.Counter()  # kernel launches by name ("rms_norm.bwd2", ...), counted by the launchers


@dataclass(frozen=True)
class NormSpec:
    """What a norm Function computes: centered (LayerNorm) or not (RMSNorm), eps, and the group depth `lead`."""

    centered: bool
    eps: float
    lead: int = 0

    @property
    def name(self) -> str:
        return "layer_norm" if self.centered else "rms_norm"

    def outer(self) -> "NormSpec":
        """The spec one vmap level up: the vmapped dimension becomes a new leading group dimension."""
        return replace(self, lead=self.lead + 1)


@dataclass(frozen=True)
class Launch:
    """Kernel launch geometry: N features, G groups of rows_per_group rows, programs of rows_per_program rows."""

    N: int
    lead_shape: torch.Size
    G: int
    rows_per_group: int
    rows_per_program: int
    grid: tuple
    block: int
    num_warps: int
    acc: object  # triton dtype of the accumulators
    acc_torch: torch.dtype


def launch_geometry(spec: NormSpec, x: torch.Tensor, *others) -> Launch:
    """Geometry for rows of `x`; accumulation in float64 when any input is float64, float32 otherwise."""
    N = x.shape[-1]
    lead_shape = x.shape[: spec.lead]
    G = math.prod(lead_shape)
    rows_per_group = x.numel() // max(N * G, 1)
    if x.is_cuda:
        programs = PROGRAMS_PER_SM * torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        programs = 4  # the CPU interpreter runs programs one after another
    rows_per_program = max(1, min(rows_per_group, triton.cdiv(rows_per_group * G, programs)))
    block = min(triton.next_power_of_2(N), MAX_BLOCK)
    fp64 = any(t is not None and t.dtype == torch.float64 for t in (x, *others))
    return Launch(
        N=N,
        lead_shape=lead_shape,
        G=G,
        rows_per_group=rows_per_group,
        rows_per_program=rows_per_program,
        grid=(G, triton.cdiv(rows_per_group, rows_per_program)),
        block=block,
        num_warps=max(1, min(16, block // 256)),
        acc=tl.float64 if fp64 else tl.float32,
        acc_torch=torch.float64 if fp64 else torch.float32,
    )


def as_rows(t: torch.Tensor, N: int) -> torch.Tensor:
    """(M, N) contiguous view (or copy) of a row tensor; M = all leading dims flattened, group-major."""
    return t.reshape(-1, N).contiguous()


def as_groups(t: torch.Tensor | None, geo: Launch) -> torch.Tensor | None:
    """(G, N) contiguous per-group vectors of a per-feature tensor of shape lead_shape + (N,)."""
    return None if t is None else t.reshape(geo.G, geo.N).contiguous()


def partials(geo: Launch, device, needed: bool) -> torch.Tensor | None:
    """Zeroed per-program partial sums (G, programs per group, N) in the accumulation dtype."""
    return torch.zeros(geo.G, geo.grid[1], geo.N, dtype=geo.acc_torch, device=device) if needed else None


def reduce_partials(part: torch.Tensor | None, geo: Launch, dtype: torch.dtype) -> torch.Tensor | None:
    """Sum the per-program partials of each group (deterministic, no atomics) -> lead_shape + (N,)."""
    return None if part is None else part.sum(1).to(dtype).reshape(*geo.lead_shape, geo.N)


def groupwise(t: torch.Tensor | None, x: torch.Tensor, lead: int) -> torch.Tensor | None:
    """View a per-feature tensor (lead_shape + (N,)) so that it broadcasts against the rows of x."""
    if t is None:
        return None
    return t.reshape(*t.shape[:-1], *([1] * (x.dim() - lead - 1)), t.shape[-1])


def vmap_rowwise(function, info, in_dims, spec: NormSpec, *tensors):
    """vmap rule of a row-wise Function(spec, *tensors): the batch dimension becomes a leading group dimension.

    Unbatched tensors are expanded over the batch (weights then act per vmap element, as vmap requires).
    """
    moved = []
    for t, dim in zip(tensors, in_dims[1:]):
        if t is None:
            moved.append(None)
        elif dim is None:
            moved.append(t.expand(info.batch_size, *t.shape))
        else:
            moved.append(t.movedim(dim, 0))
    out = function.apply(spec.outer(), *moved)
    if isinstance(out, torch.Tensor):
        return out, 0
    return out, tuple(None if o is None else 0 for o in out)
