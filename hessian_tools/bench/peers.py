"""The peers a researcher would pick, driven on the same model, batch and dtype as ours, each through its API.

- PyHessian 0.1: `hessian(model, criterion, data=(x, y))`; `eigenvalues()` (power iteration: the dominant
  eigenvalue), `trace()` (Hutchinson). Its HVPs are observed by wrapping `hessian_vector_product`.
- hessian-eigenthings 1.0a5: `HessianOperator(model, [batch], loss_fn)`; `lanczos(k=1, which, max_iter)` (a
  fixed number of steps, no stopping rule), `deflated_power_iteration(k=1, max_iter, tol)`, `hutchinson`,
  `hutch_plus_plus` (with standard errors).
- curvlinops 3.0.1: `HessianLinearOperator(model, loss, params, [(x, y)])`, `.to_scipy()` into scipy's
  `eigsh` (ARPACK), and its `hutchinson_trace`, `hutchpp_trace`, `xtrace` (estimates without an error).
Every product a peer makes is counted here by wrapping its operator (`Counted`): (seconds since the start,
Rayleigh quotient v.Hv / v.v) per HVP, so the first iterate within an accuracy can be read off afterwards.
The peers live in their own virtual environment (`benchmarks/install_peers.sh`); `require` says so in one line.
"""

from __future__ import annotations

import copy
import importlib
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hessian_tools.errors import UserError

INSTALL = "bash benchmarks/install_peers.sh"
PACKAGES = {"pyhessian": "PyHessian 0.1", "hessian_eigenthings": "hessian-eigenthings 1.0a5",
            "curvlinops": "curvlinops 3.0.1"}


def require(*modules: str) -> None:
    """UserError naming the install script if a peer is missing."""
    missing = [PACKAGES[m] for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"bench --peers needs {', '.join(missing)}: install them into their own virtual "
                        f"environment with `{INSTALL}` and run that environment's hessian-tools")


class FlatLogits(nn.Module):
    """A GPT as the peers see a classifier: model(idx) -> (B*T, V) logits, on the math attention path."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx):
        from models.gpt import math_attention

        with math_attention():
            return self.model(idx).flatten(0, 1)


class Counted:
    """Records (seconds since `start`, v.Hv / v.v) for every product `record(v, hv)` sees."""

    def __init__(self):
        self.start = time.perf_counter()
        self.trace: list[tuple[float, float]] = []

    def record(self, v: torch.Tensor, hv: torch.Tensor):
        v, hv = v.detach().double().reshape(-1), hv.detach().double().reshape(-1)
        self.trace.append((time.perf_counter() - self.start, float(v @ hv / (v @ v))))

    @property
    def hvps(self) -> int:
        return len(self.trace)

    def first_within(self, reference: float, accuracy: float):
        """(HVPs, seconds) at the first Rayleigh quotient within `accuracy` (relative) of `reference`, or None."""
        for i, (seconds, q) in enumerate(self.trace):
            if abs(q - reference) <= accuracy * abs(reference):
                return i + 1, seconds
        return None


def _peer_model(model: nn.Module) -> FlatLogits:
    return FlatLogits(copy.deepcopy(model).float().eval().requires_grad_(True))


# ------------------------------------------------------------------------------------------------ PyHessian


def pyhessian(model: nn.Module, batch, method: str, **kwargs):
    """(result of hessian(...).method(**kwargs), Counted) with the set-up included in the time."""
    require("pyhessian")
    from pyhessian import hessian
    from pyhessian.utils import group_product

    module = sys.modules["pyhessian.hessian"]
    original = module.hessian_vector_product
    counted = Counted()

    def product(grads, params, v):
        hv = original(grads, params, v)
        counted.trace.append((time.perf_counter() - counted.start,
                              float(group_product(hv, v)) / float(group_product(v, v))))
        return hv

    module.hessian_vector_product = product
    try:
        with warnings.catch_warnings():  # its loss.backward(create_graph=True) warns of a reference cycle
            warnings.filterwarnings("ignore", message="Using backward")
            comp = hessian(_peer_model(model), F.cross_entropy, data=(batch[0], batch[1].flatten()), cuda=False)
            result = getattr(comp, method)(**kwargs)
    finally:
        module.hessian_vector_product = original
    return result, counted


# ------------------------------------------------------------------------------------- hessian-eigenthings


def eigenthings(model: nn.Module, batch, algorithm: str, **kwargs):
    """(result of hessian_eigenthings.<algorithm>(operator, **kwargs), Counted)."""
    require("hessian_eigenthings")
    import hessian_eigenthings as he

    counted = Counted()
    net = _peer_model(model)
    op = he.HessianOperator(net, [(batch[0], batch[1].flatten())],
                            lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    def product(v):
        hv = op.matvec(v)
        counted.record(v, hv)
        return hv

    counting = he.LambdaOperator(product, op.size, op.device, op.dtype)
    return getattr(he, algorithm)(counting, **kwargs), counted


# ---------------------------------------------------------------------------------------------- curvlinops


def curvlinops_operator(model: nn.Module, batch, counted: Counted):
    """curvlinops' HessianLinearOperator as a scipy LinearOperator whose matvecs are counted."""
    require("curvlinops")
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator

    net = _peer_model(model)
    op = HessianLinearOperator(net, torch.nn.CrossEntropyLoss(), [p for p in net.parameters()],
                               [(batch[0], batch[1].flatten())])

    def mv(x):
        x = torch.as_tensor(np.asarray(x, dtype=np.float32).reshape(-1))
        hx = op @ x
        counted.record(x, hx)
        return hx.detach().numpy().astype(np.float64)

    n = op.shape[0]
    return op, LinearOperator((n, n), matvec=mv, rmatvec=mv, dtype=np.float64)


def curvlinops_eigsh(model: nn.Module, batch, which: str, tol: float):
    """(eigenvalue, Counted) of scipy's eigsh(k=1, which=LA|SA|LM, tol) on curvlinops' Hessian."""
    from scipy.sparse.linalg import eigsh

    counted = Counted()
    _, linop = curvlinops_operator(model, batch, counted)
    value = float(eigsh(linop, k=1, which=which, tol=tol, return_eigenvectors=False)[0])
    return value, counted


def curvlinops_trace(model: nn.Module, batch, method: str, num_matvecs: int):
    """(estimate, Counted) of curvlinops' hutchinson_trace | hutchpp_trace | xtrace."""
    import curvlinops

    counted = Counted()
    op, _ = curvlinops_operator(model, batch, counted)
    counting = _CurvlinopsCounting(op, counted)
    return float(getattr(curvlinops, method)(counting, num_matvecs)), counted


class _CurvlinopsCounting:
    """A (n, n) torch matrix-like object whose `@` goes to curvlinops' operator, counting columns."""

    def __init__(self, op, counted: Counted):
        self.op, self.counted, self.shape = op, counted, op.shape
        self.device, self.dtype = op.device, op.dtype

    def __matmul__(self, X):
        out = self.op @ X
        for j in range(X.shape[1] if X.ndim == 2 else 1):
            x, y = (X[:, j], out[:, j]) if X.ndim == 2 else (X, out)
            self.counted.record(x, y)
        return out
