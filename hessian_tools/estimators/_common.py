"""Shared plumbing of the estimators: operator checks, seeded probe vectors, guarded products, settings, and the
vector arithmetic of sharded operators.

Sharded operators. An operator with a `shard` attribute (hessian_tools.distributed.Shard; e.g.
ShardedBlockOperator) has shape (n, n) but takes and returns only this rank's rows of every vector (local_n of
them). The estimators then keep only shards, and take every inner product and norm through `dot`, `norm` and
`summed`, which add the ranks' partial sums with one all-reduce of a scalar or a short coefficient vector. Random
vectors are drawn at the full length n from the same CPU generator on every rank and cut to the rank's rows
(`local`), so a sharded run draws the same probes as a single process: each draw is a transient n-length
float64 tensor on the CPU (8 n k bytes for k probes). Every rank performs the same iteration, since every scalar
it branches on is all-reduced. Without a shard, each helper is the plain single-process operation.
"""

from __future__ import annotations

import math

import torch

from hessian_tools.errors import UserError

FLOAT = torch.float64


class NonFiniteProduct(Exception):
    """An operator product returned NaN or Inf; estimators turn it into a failed record."""


def dimension(op) -> int:
    """n for a square operator of shape (n, n) with n >= 1; UserError otherwise."""
    shape = tuple(getattr(op, "shape", ()))
    if len(shape) != 2 or shape[0] != shape[1]:
        raise UserError(f"operator shape {shape} is not square (n, n); pass a Hessian operator")
    if shape[0] < 1:
        raise UserError("operator has dimension 0: no parameters or activations selected; check params/site")
    return int(shape[0])


def device_of(op) -> torch.device:
    return torch.device(getattr(op, "device", "cpu"))


def operator_settings(op) -> dict:
    settings = getattr(op, "settings", None)
    return dict(settings()) if callable(settings) else {}


def positive_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{name}={value!r} must be an integer >= {low}")
    return value


def positive_float(name: str, value) -> float:
    if not isinstance(value, (int, float)) or not value > 0:
        raise UserError(f"{name}={value!r} must be a positive number")
    return float(value)


def generator(seed: int) -> torch.Generator:
    """CPU generator: the same seed gives the same probes on every device and rank."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed={seed!r} must be an integer")
    return torch.Generator(device="cpu").manual_seed(seed)


def probes(op, gen: torch.Generator, k: int, distribution: str) -> torch.Tensor:
    """(n, k) float64 probes with E[z z^T] = I, Rademacher (+-1) or standard Gaussian, on op's device; for a
    sharded op, this rank's rows of them (drawn at full length: module docstring)."""
    n = dimension(op)
    if distribution == "rademacher":
        z = torch.randint(0, 2, (k, n), generator=gen, dtype=FLOAT).mul_(2).sub_(1)
    elif distribution == "gaussian":
        z = torch.randn((k, n), generator=gen, dtype=FLOAT)
    else:
        raise UserError(f"distribution={distribution!r} must be 'rademacher' or 'gaussian'")
    return local(op, z.T).contiguous().to(device_of(op))


def gaussian(op, gen: torch.Generator, device=None) -> torch.Tensor:
    """A standard Gaussian vector of op's length n (this rank's rows of it for a sharded op), float64 on `device`
    (default op's)."""
    return local(op, torch.randn(dimension(op), generator=gen, dtype=FLOAT)).to(device or device_of(op))


def stored_length(op) -> int:
    """Entries a rank stores per vector: n, or for a sharded op the largest rank's local_n (the same on every rank,
    so that budgets sized by it give every rank the same iteration)."""
    shard = getattr(op, "shard", None)
    return dimension(op) if shard is None else shard.largest_local_n


def local(op, x: torch.Tensor) -> torch.Tensor:
    """The rows of x (length n along dim 0) that this rank holds: x itself unless op is sharded."""
    shard = getattr(op, "shard", None)
    return x if shard is None else shard.take(x)


def whole(op, x: torch.Tensor) -> torch.Tensor:
    """x as a full length-n vector: x itself, unless op is sharded and x is this rank's shard (local_n entries),
    which is then assembled from every rank's shard (one n-length all-reduce; every rank must pass its shard)."""
    shard = getattr(op, "shard", None)
    if shard is None or x.ndim != 1 or x.numel() != shard.local_n or x.numel() == shard.n:
        return x
    return shard.whole(x)


def summed(op, x):
    """Partial sums (a tensor, or a list of tensors) added over the ranks of a sharded op, with one all-reduce;
    x itself otherwise."""
    shard = getattr(op, "shard", None)
    if shard is None:
        return x
    if isinstance(x, torch.Tensor):
        return shard.sum(x)
    flat = shard.sum(torch.cat([t.reshape(-1) for t in x]))
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in x]), x)]


def dot(op, x: torch.Tensor, y: torch.Tensor) -> float:
    """x . y over the whole vectors (x, y: shards for a sharded op)."""
    return float(summed(op, x @ y))


def norm(op, x: torch.Tensor) -> float:
    """||x||_2 over the whole vector (x: a shard for a sharded op)."""
    if getattr(op, "shard", None) is None:
        return float(torch.linalg.vector_norm(x))
    return math.sqrt(float(summed(op, x @ x)))


def orthonormal_columns(op, Y: torch.Tensor) -> torch.Tensor:
    """Q with orthonormal columns spanning those of Y (n x k): Householder QR; for a sharded op, TSQR (each rank
    factors its rows, and the stacked k x k R factors, all-gathered, are factored again)."""
    shard = getattr(op, "shard", None)
    if shard is None:
        return torch.linalg.qr(Y, mode="reduced").Q
    k = Y.shape[1]
    if k > shard.n:
        raise UserError(f"{k} columns exceed the operator size {shard.n}: ask for fewer probes")
    Q1, R1 = torch.linalg.qr(Y, mode="reduced")
    R = torch.zeros(k, k, dtype=R1.dtype, device=R1.device)
    R[: R1.shape[0]] = R1
    Q2 = torch.linalg.qr(shard.gather(R).reshape(-1, k), mode="reduced").Q
    return Q1 @ Q2[shard.rank * k: shard.rank * k + R1.shape[0]]


def _finite(op, x: torch.Tensor) -> bool:
    """Every entry of x (on every rank, for a sharded op) is finite."""
    finite = bool(torch.isfinite(x).all())
    if getattr(op, "shard", None) is None:
        return finite
    return float(summed(op, torch.tensor([float(not finite)], dtype=FLOAT, device=x.device))) == 0.0


def matvec(op, v: torch.Tensor) -> torch.Tensor:
    """op @ v as a float64 vector; NonFiniteProduct if it holds NaN or Inf (on any rank)."""
    w = op.matvec(v).to(FLOAT)
    if not _finite(op, w):
        raise NonFiniteProduct("the Hessian-vector product returned NaN or Inf")
    return w


def matmat(op, V: torch.Tensor) -> torch.Tensor:
    """op @ V as a float64 (n, k) matrix; NonFiniteProduct if it holds NaN or Inf (on any rank)."""
    W = op.matmat(V).to(FLOAT)
    if not _finite(op, W):
        raise NonFiniteProduct("a Hessian-matrix product returned NaN or Inf")
    return W
