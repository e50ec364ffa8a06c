"""Shared plumbing of the estimators: operator checks, seeded probe vectors, guarded products, settings."""

from __future__ import annotations

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


def probes(gen: torch.Generator, n: int, k: int, distribution: str, device) -> torch.Tensor:
    """(n, k) float64 probes with E[z z^T] = I: Rademacher (+-1) or standard Gaussian."""
    if distribution == "rademacher":
        z = torch.randint(0, 2, (k, n), generator=gen, dtype=FLOAT).mul_(2).sub_(1)
    elif distribution == "gaussian":
        z = torch.randn((k, n), generator=gen, dtype=FLOAT)
    else:
        raise UserError(f"distribution={distribution!r} must be 'rademacher' or 'gaussian'")
    return z.T.contiguous().to(device)


def matvec(op, v: torch.Tensor) -> torch.Tensor:
    """op @ v as a float64 vector; NonFiniteProduct if it holds NaN or Inf."""
    w = op.matvec(v).to(FLOAT)
    if not bool(torch.isfinite(w).all()):
        raise NonFiniteProduct("the Hessian-vector product returned NaN or Inf")
    return w


def matmat(op, V: torch.Tensor) -> torch.Tensor:
    """op @ V as a float64 (n, k) matrix; NonFiniteProduct if it holds NaN or Inf."""
    W = op.matmat(V).to(FLOAT)
    if not bool(torch.isfinite(W).all()):
        raise NonFiniteProduct("a Hessian-matrix product returned NaN or Inf")
    return W
