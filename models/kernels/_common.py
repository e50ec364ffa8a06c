"""Launch helpers shared by the row-wise norm kernels: layout, program grid, accumulation dtype, device guard,
launch counters, the transform checks and the vmap rule.

Layout convention: a row-wise op sees `x` of shape lead_shape + rest + (N,), normalized over the last dim.
Per-feature tensors (weight, bias and their cotangents) have shape lead_shape + (N,): one vector per group of
rows. Public calls use lead = 0 (one group, one vector of shape (N,)); every vmap level adds one leading group
dimension, so vmapped weights and weight gradients that are sums over rows stay per vmap element.
"""

import collections
import contextlib
import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

MAX_BLOCK = 4096  # widest chunk of a row a program holds at once; wider rows loop over chunks
PROGRAMS_PER_SM = 8  # most programs per streaming multiprocessor (each loops over a range of rows)
BYTES_IN_FLIGHT = 32 * 1024  # row bytes per SM a kernel with weight-gradient partials aims to have loading
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
    device: torch.device


def programs_per_sm(N: int, itemsize: int, row_tensors: int) -> int:
    """Programs per SM for a kernel that keeps one weight-gradient partial per program: as few as keep
    BYTES_IN_FLIGHT of rows loading (each program loads `row_tensors` rows of N elements at a time), so that the
    partials (written once per program, then summed) stay a small part of the traffic. At most PROGRAMS_PER_SM."""
    return max(1, min(PROGRAMS_PER_SM, triton.cdiv(BYTES_IN_FLIGHT, max(1, N * itemsize * row_tensors))))


def launch_geometry(spec: NormSpec, x: torch.Tensor, *others, row_tensors: int = 0) -> Launch:
    """Geometry for rows of `x`; accumulation in float64 when any input is float64, float32 otherwise.

    `row_tensors` > 0 marks a kernel with per-program weight-gradient partials that loads that many row tensors
    (see `programs_per_sm`); 0, a kernel without partials (PROGRAMS_PER_SM programs per SM).
    """
    N = x.shape[-1]
    lead_shape = x.shape[: spec.lead]
    G = math.prod(lead_shape)
    rows_per_group = math.prod(x.shape[spec.lead : -1])
    if x.is_cuda:
        per_sm = programs_per_sm(N, x.element_size(), row_tensors) if row_tensors else PROGRAMS_PER_SM
        programs = per_sm * torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        programs = 4  # the CPU interpreter runs programs one after another
    rows_per_program = max(1, min(rows_per_group, triton.cdiv(rows_per_group * G, programs)))
    block = max(1, min(triton.next_power_of_2(N), MAX_BLOCK))
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
        device=x.device,
    )


def device_guard(device: torch.device):
    """The CUDA device context a launch must run in (Triton launches on the current device); none on CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def as_rows(t: torch.Tensor, N: int) -> torch.Tensor:
    """(M, N) contiguous view (or copy) of a row tensor; M = all leading dims flattened, group-major."""
    return t.reshape(math.prod(t.shape[:-1]), N).contiguous()


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


def needs_composite() -> bool:
    """True inside transforms the fused Functions cannot serve, where the composite norm must be used: two or
    more torch.func forward-mode levels (jvp of jvp, jacfwd of hessian, ...), or four or more levels of
    differentiation in all (fourth derivatives by torch.func).

    PyTorch runs an autograd.Function's `jvp` rule with forward AD switched off, so an outer forward level sees
    its result as a constant (pytorch#197867): third derivatives by forward over forward would come out zero.
    And the torch.func.vjp that differentiates the double backward (third order) fails an internal functorch
    assertion when a fourth level differentiates it in turn.
    """
    if not torch._C._are_functorch_transforms_active():
        return False
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    keys = [i.key() for i in retrieve_all_functorch_interpreters()]
    forward = keys.count(TransformType.Jvp)
    return forward > 1 or forward + keys.count(TransformType.Grad) > 3


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
