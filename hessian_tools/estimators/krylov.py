"""The Lanczos recurrence with full reorthogonalisation, shared by `lanczos` and `slq_density`.

Convention: after m steps, H Q_m = Q_m T_m + beta_m q_{m+1} e_m^T (+ E), with Q_m (n x m, float64, on
the start vector's device) orthonormal to rounding and T_m tridiagonal. Every new vector is orthogonalised against the whole
basis twice with classical Gram-Schmidt ("twice is enough"). Cost: one HVP per step; memory 8 n (m + 1) bytes.

An invariant subspace (beta ~ 0) ends the recurrence, or, with `restart=True`, continues from a fresh random
vector orthogonal to the basis (T_m becomes block-diagonal). A beta dropped this way is recorded in
`dropped` and added to every residual bound, so bounds stay certified; so is a rounding floor of
10 m eps ||T||, below which a computed residual |beta_m s_mi| cannot be trusted.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch

from hessian_tools.estimators._common import FLOAT, matvec

BREAKDOWN_RTOL = 1e-12  # beta below this times ||T|| counts as an invariant subspace
BLOCK = 16  # basis vectors are stored in blocks of this many rows: growth never copies the basis


class KrylovBasis:
    """Grows the Lanczos basis one HVP at a time; `ritz()` returns the current Ritz values and residuals.

    The basis lives in (BLOCK, n) float64 blocks on v0's device, one contiguous row per vector, so memory
    grows with the steps taken (8 n BLOCK bytes at a time) and is never copied.
    """

    def __init__(self, op, v0: torch.Tensor, max_steps: int, gen: torch.Generator | None = None):
        self.op, self.n, self.max_steps, self.gen = op, v0.numel(), max_steps, gen
        self.blocks: list[torch.Tensor] = []
        self.alpha: list[float] = []
        self.beta: list[float] = []  # beta[j] couples q_j and q_{j+1}; 0 at a restart
        self.dropped = 0.0
        self.breakdowns = 0
        self.exhausted = False
        v = v0.to(FLOAT)
        self._store(0, v / torch.linalg.vector_norm(v))

    @property
    def m(self) -> int:
        return len(self.alpha)

    def _store(self, j: int, v: torch.Tensor):
        b, i = divmod(j, BLOCK)
        if b == len(self.blocks):
            rows = min(BLOCK, self.max_steps + 1 - b * BLOCK)
            self.blocks.append(torch.empty(rows, self.n, dtype=FLOAT, device=v.device))
        self.blocks[b][i] = v

    def _vector(self, j: int) -> torch.Tensor:
        b, i = divmod(j, BLOCK)
        return self.blocks[b][i]

    def _basis(self) -> list[torch.Tensor]:
        """Blocks of q_0 .. q_{m-1}, each (rows, n)."""
        return [blk[: min(BLOCK, self.m - b * BLOCK)] for b, blk in enumerate(self.blocks) if b * BLOCK < self.m]

    def _orthogonalise(self, w: torch.Tensor) -> torch.Tensor:
        """Classical Gram-Schmidt against q_0 .. q_{m-1}, twice: all coefficients from the same w."""
        basis = self._basis()
        for _ in range(2):
            coefficients = [blk @ w for blk in basis]
            for blk, h in zip(basis, coefficients):
                w = w - blk.T @ h
        return w

    def step(self):
        """One Lanczos step: one HVP, alpha_j, beta_j and the next basis vector."""
        j = self.m
        q = self._vector(j)
        w = matvec(self.op, q)
        self.alpha.append(float(q @ w))
        w = self._orthogonalise(w)
        beta = float(torch.linalg.vector_norm(w))
        scale = max(max(abs(a) for a in self.alpha), max(self.beta, default=0.0))
        if self.m >= self.n:  # the basis spans the whole space: T_n is exact
            self.dropped = max(self.dropped, beta)
            self.beta.append(0.0)
            self.exhausted = True
        elif beta > BREAKDOWN_RTOL * scale:
            self.beta.append(beta)
            self._store(j + 1, w / beta)
        else:
            self.dropped = max(self.dropped, beta)
            self.beta.append(0.0)
            self.breakdowns += 1
            if self.gen is None:
                self.exhausted = True
            else:
                fresh = torch.randn(self.n, generator=self.gen, dtype=FLOAT).to(q.device)
                fresh = self._orthogonalise(fresh)
                self._store(j + 1, fresh / torch.linalg.vector_norm(fresh))

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), eigenvectors S of T_m (m x m), residual bounds (see the module docstring)."""
        d = np.asarray(self.alpha)
        e = np.asarray(self.beta[: self.m - 1])
        if self.m == 1:
            theta, S = d.copy(), np.ones((1, 1))
        else:
            theta, S = scipy.linalg.eigh_tridiagonal(d, e)
        residuals = np.abs(self.beta[-1] * S[-1, :]) + self.dropped + self.rounding(theta)
        return theta, S, residuals

    def rounding(self, theta: np.ndarray) -> float:
        """10 m eps ||T||: the accuracy floor of computed Ritz values and residuals."""
        return 10 * self.m * np.finfo(np.float64).eps * float(np.max(np.abs(theta)))

    def ritz_vectors(self, S_cols: np.ndarray) -> torch.Tensor:
        """Q_m @ S[:, cols]: (n, len(cols)) float64 Ritz vectors."""
        S_t = torch.as_tensor(S_cols, dtype=FLOAT, device=self.blocks[0].device)
        return sum(blk.T @ S_t[b * BLOCK: b * BLOCK + blk.shape[0]] for b, blk in enumerate(self._basis()))
