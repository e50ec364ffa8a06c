"""Shared test utilities: a matrix-backed operator, random symmetric matrices with a known spectrum, and a
small MLP whose dense float64 Hessian is built by double backward of unit vectors and confirmed by central
differences of the gradient (an independent path: no jacrev, no torch.func.hessian).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class DenseOperator:
    """The operator interface of hessian_tools over an explicit symmetric matrix (float64, CPU)."""

    mode = "dense"

    def __init__(self, matrix, total_weight: float = 1.0):
        self.matrix = torch.as_tensor(np.asarray(matrix), dtype=torch.float64)
        self.shape = tuple(self.matrix.shape)
        self.device = self.matrix.device
        self.dtype = torch.float64
        self.hvp_count = 0
        self.total_weight = total_weight

    def matvec(self, v):
        self.hvp_count += 1
        return self.matrix @ v.to(torch.float64)

    def matmat(self, V):
        self.hvp_count += V.shape[1]
        return self.matrix @ V.to(torch.float64)

    def settings(self):
        return {"kind": "dense", "n": self.shape[0]}


def symmetric_with_spectrum(eigenvalues, seed: int = 0) -> np.ndarray:
    """Q diag(eigenvalues) Q^T with a Haar-random orthogonal Q (float64)."""
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    q = q * np.sign(np.diag(r))
    a = (q * eigenvalues) @ q.T
    return (a + a.T) / 2


# Spectra with known answers: clustered bulk, indefinite, a degenerate top eigenvalue, tiny n.
SPECTRA = {
    "indefinite": np.concatenate([[10.0, 7.0, 5.0], np.linspace(-3.0, 2.0, 57), [-6.0, -9.0]]),
    "clustered": np.concatenate([[4.0, 3.0], 1.0 + 1e-3 * np.arange(60), [-2.0]]),
    "degenerate_top": np.concatenate([[5.0, 5.0, 5.0], np.linspace(-1.0, 1.0, 40), [-4.0]]),
    "tiny": np.array([2.0, -1.0, 0.5]),
}


def make_mlp(d_in: int = 4, hidden: int = 6, d_out: int = 3, layer_norm: bool = True, seed: int = 0,
             dtype=torch.float64) -> nn.Module:
    """Linear -> (LayerNorm) -> tanh -> Linear, in eval mode."""
    torch.manual_seed(seed)
    layers = [nn.Linear(d_in, hidden)] + ([nn.LayerNorm(hidden)] if layer_norm else []) + [nn.Tanh(),
                                                                                          nn.Linear(hidden, d_out)]
    return nn.Sequential(*layers).to(dtype).eval()


def make_batches(n_batches: int, batch_size: int = 5, d_in: int = 4, d_out: int = 3, seed: int = 1,
                 dtype=torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random (x, y) classification batches; sizes vary (batch_size + i) so weighting matters."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size + i, d_in, generator=gen, dtype=dtype),
             torch.randint(0, d_out, (batch_size + i,), generator=gen)) for i in range(n_batches)]


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def loss_at(model: nn.Module, theta: torch.Tensor, batches) -> torch.Tensor:
    """Mean cross-entropy over the union of `batches` at flat parameters theta."""
    params, i = {}, 0
    for name, p in model.named_parameters():
        params[name] = theta[i:i + p.numel()].view_as(p)
        i += p.numel()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)


def gradient_at(model, theta, batches) -> torch.Tensor:
    theta = theta.detach().clone().requires_grad_(True)
    return torch.autograd.grad(loss_at(model, theta, batches), theta)[0]


def dense_hessian(model: nn.Module, batches, check_columns: int = 4, step: float = 1e-5) -> np.ndarray:
    """Dense float64 Hessian of the mean loss on the union of `batches`, row by row by double backward.

    Confirmed against central differences of the gradient on `check_columns` columns (error O(step^2));
    raises AssertionError if they disagree.
    """
    theta = flat_params(model).to(torch.float64).requires_grad_(True)
    grad = torch.autograd.grad(loss_at(model, theta, batches), theta, create_graph=True)[0]
    n = theta.numel()
    rows = [torch.autograd.grad(grad[i], theta, retain_graph=True)[0] for i in range(n)]
    hess = torch.stack(rows).detach()
    base = theta.detach()
    for i in np.linspace(0, n - 1, check_columns).astype(int):
        e = torch.zeros(n, dtype=torch.float64)
        e[i] = step
        fd = (gradient_at(model, base + e, batches) - gradient_at(model, base - e, batches)) / (2 * step)
        assert torch.allclose(fd, hess[:, i], rtol=1e-6, atol=1e-7), f"double backward disagrees with FD at {i}"
    return ((hess + hess.T) / 2).numpy()


class BatchHessianOperator:
    """Hessian of the mean cross-entropy over `batches` by double backward (test stand-in for ParamHessian).

    Batches are weighted by their number of targets, so the operator is the Hessian of the mean loss on
    their union; `total_weight` is that number (the contract DistributedOperator relies on).
    """

    mode = "double-backward"

    def __init__(self, model: nn.Module, batches):
        self.model, self.batches = model, list(batches)
        self.theta = flat_params(model).to(torch.float64)
        self.shape = (self.theta.numel(), self.theta.numel())
        self.device = self.theta.device
        self.dtype = torch.float64
        self.hvp_count = 0
        self.weights = [float(b[1].numel()) for b in self.batches]
        self.total_weight = sum(self.weights)
        self._graphs = None  # (theta, gradient with graph) per batch, built on the first product

    def matvec(self, v):
        self.hvp_count += 1
        if self._graphs is None:
            self._graphs = []
            for batch in self.batches:
                theta = self.theta.clone().requires_grad_(True)
                grad = torch.autograd.grad(loss_at(self.model, theta, [batch]), theta, create_graph=True)[0]
                self._graphs.append((theta, grad))
        out = torch.zeros_like(self.theta)
        for w, (theta, grad) in zip(self.weights, self._graphs):
            hv = torch.autograd.grad(grad, theta, grad_outputs=v.to(torch.float64), retain_graph=True)[0]
            out += (w / self.total_weight) * hv
        return out

    def matmat(self, V):
        return torch.stack([self.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    def settings(self):
        return {"kind": "mlp-test", "batches": len(self.batches)}
