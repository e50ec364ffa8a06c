"""The curvature-operator contract shared by every operator and used by every estimator.

An operator is a symmetric n x n matrix known only through products. Products are evaluated in
`dtype` (float32 or float64) on `device` and returned in float64; `hvp_count` counts one per vector.
"""

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator

from hessian_tools.errors import UserError


class CurvatureOperator:
    """Base class: `shape`, `dtype`, `device`, `hvp_count`, `mode`, `matvec`, `matmat`, `to_scipy`, `settings`.

    Subclasses implement `_matvec(v)` and `_matmat(V)` on tensors already in `dtype` on `device`.
    """

    kind = ""
    input_dtype = None  # the dtype `_matvec` / `_matmat` receive vectors in (None: `dtype`)

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device):
        self.shape = (n, n)
        self.dtype = dtype
        self.device = torch.device(device)
        self.hvp_count = 0

    @property
    def mode(self) -> str:
        raise NotImplementedError

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def settings(self) -> dict:
        raise NotImplementedError

    def _cast(self, x: torch.Tensor, ndim: int) -> torch.Tensor:
        x = torch.as_tensor(x)
        n = self.shape[0]
        if x.ndim != ndim or x.shape[0] != n or not x.is_floating_point():
            want = f"({n},)" if ndim == 1 else f"({n}, k)"
            raise UserError(f"expected a float tensor of shape {want}, got {x.dtype} {tuple(x.shape)}")
        return x.to(device=self.device, dtype=self.input_dtype or self.dtype)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat vector v of length n (any float dtype/device); float64 result on `device`."""
        out = self._matvec(self._cast(v, 1))
        self.hvp_count += 1
        return out.to(torch.float64)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """H V for V of shape (n, k); float64 (n, k) result; counts k products."""
        V = self._cast(V, 2)
        if V.shape[1] == 0:
            return torch.zeros(V.shape, dtype=torch.float64, device=self.device)
        out = self._matmat(V)
        self.hvp_count += V.shape[1]
        return out.to(torch.float64)

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        return self.matvec(x) if torch.as_tensor(x).ndim == 1 else self.matmat(x)

    def to_scipy(self) -> LinearOperator:
        """A float64 scipy LinearOperator (numpy in, numpy out) backed by this operator; symmetric."""

        def mv(x):
            x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1))
            return self.matvec(x).cpu().numpy()

        def mm(X):
            X = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float64))
            return self.matmat(X).cpu().numpy()

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mm, rmatmat=mm, dtype=np.float64)
