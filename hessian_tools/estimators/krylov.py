"""The Lanczos recurrence with full reorthogonalisation, shared by `lanczos` and `slq_density`.

Convention: after m steps, H Q_m = Q_m T_m + beta_m q_{m+1} e_m^T + E, with Q_m (n x m, float64, on the start
vector's device) orthonormal to rounding, T_m tridiagonal and E the defect of the computed relation. Every new
vector is orthogonalised against the whole basis twice with classical Gram-Schmidt ("twice is enough"). Cost:
one HVP per step; memory 8 n (m + 1) bytes, or 4 n (m + 1) with the basis stored in float32.

Storage. The basis may be stored in float32 (`storage`, for float32 operators at scale: 124M parameters take
0.5 GB per vector instead of 1 GB); the arithmetic stays float64 (stored rows are cast chunk by chunk), so the
only extra error is each stored vector's own rounding q_stored - q, of norm <= eps32. It enters the defect E
exactly (beta_j ||q_stored - q|| is added to column j's error, measured), and it leaves Q^T Q - I with entries of
order eps32, so the floor below uses the storage's epsilon: ||Q^T Q - I|| <= m eps moves Ritz values by at most
m eps ||T|| (Ostrowski), within the floor's 10 m eps ||T||.

E is bounded column by column, ||E e_j|| <= column_errors[j] = ||h_j - T e_j|| + rounding ||H q_j|| (+ a dropped
beta): h_j are the Gram-Schmidt coefficients actually removed from the product (T keeps only alpha_j, beta_{j-1};
the rest is the product's rounding seen in the basis) and `rounding` a bound on the products' relative rounding
(0 for float64 products, measured for float32 ones). So a Ritz pair (theta, y = Q s) has
||H y - theta y|| <= |beta_m s_m| + sum_j |s_j| column_errors[j] + 10 m eps ||T||: the last term is the floor below
which computed Ritz values and residuals cannot be trusted (eps: the storage's machine epsilon).

An invariant subspace (beta ~ 0) ends the recurrence, or, given a generator, continues from a fresh Gaussian
vector projected off the basis (T_m becomes block-diagonal; `block_starts` and `start_norms` record where each
block starts and the norm of its projected Gaussian). The beta dropped there joins that column's error.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch

from hessian_tools.estimators._common import FLOAT, dimension, dot, gaussian, matvec, norm, summed

BREAKDOWN_RTOL = 1e-12  # beta below this times ||T|| counts as an invariant subspace
BLOCK = 16  # basis vectors are stored in blocks of at most this many rows: growth never copies the basis
BLOCK_BYTES = 2**30  # ... and at most this many bytes (one row if a vector is larger), so growth overshoots little
CHUNK = 2**20  # entries per float64 cast of float32-stored rows


class KrylovBasis:
    """Grows the Lanczos basis one HVP at a time; `ritz()` returns the current Ritz values and residuals.

    The basis lives in (rows, n) blocks of dtype `storage` (float64 or float32) on v0's device, one contiguous
    row per vector, rows = min(BLOCK, BLOCK_BYTES // (itemsize n)) or 1, so memory grows with the steps taken
    (one block at a time) and is never copied. n is the length of the stored vectors: the operator's dimension
    `dim`, or this rank's local_n for a sharded operator (`_common`), whose inner products and norms are
    all-reduced.
    """

    def __init__(self, op, v0: torch.Tensor, max_steps: int, gen: torch.Generator | None = None,
                 rounding: float = 0.0, storage: torch.dtype = FLOAT):
        self.op, self.n, self.max_steps, self.gen, self.rounding = op, v0.numel(), max_steps, gen, rounding
        self.dim = dimension(op)
        self.storage = storage
        self.rows = max(1, min(BLOCK, BLOCK_BYTES // (storage.itemsize * self.n)))
        self.blocks: list[torch.Tensor] = []
        self.alpha: list[float] = []
        self.beta: list[float] = []  # beta[j] couples q_j and q_{j+1}; 0 at a restart
        self.defects: list[float] = []  # column errors without the products' rounding (module docstring)
        self.product_norms: list[float] = []  # ||H q_j||, which the rounding bound multiplies
        self.block_starts = [0]
        self.start_norms = [norm(op, v0)]  # ||v0||, then each restart's ||P g||
        self.breakdowns = 0
        self.exhausted = False
        v = v0.to(FLOAT)
        self.start_roundings = [self._store(0, v / norm(op, v))]  # ||stored - exact|| per block start

    @property
    def m(self) -> int:
        return len(self.alpha)

    @property
    def column_errors(self) -> np.ndarray:
        """Bounds on ||E e_j|| (module docstring), with the current `rounding` (it may be set after the first step)."""
        return np.asarray(self.defects) + self.rounding * np.asarray(self.product_norms)

    def first_product(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(q_0, alpha_0 q_0 + beta_0 q_1, a bound on the distance of the latter to the computed product H q_0):
        H q_0 rebuilt from the basis after the first step, for measuring its rounding without keeping it."""
        q = self._vector(0)
        v = self.alpha[0] * q
        if self.beta[0] > 0:
            v += self.beta[0] * self._vector(1)
        return q, v, self.defects[0]

    def _store(self, j: int, v: torch.Tensor) -> float:
        """Stores q_j = v; returns ||stored - v|| (0 for float64 storage)."""
        b, i = divmod(j, self.rows)
        if b == len(self.blocks):
            rows = min(self.rows, self.max_steps + 1 - b * self.rows)
            self.blocks.append(torch.empty(rows, self.n, dtype=self.storage, device=v.device))
        row = self.blocks[b][i]
        row.copy_(v)
        if self.storage == FLOAT:
            return 0.0
        squares = sum(float(torch.linalg.vector_norm(row[s: s + CHUNK].to(FLOAT) - v[s: s + CHUNK])) ** 2
                      for s in range(0, self.n, CHUNK))
        return math.sqrt(float(summed(self.op, torch.tensor(squares, dtype=FLOAT, device=v.device))))

    def _vector(self, j: int) -> torch.Tensor:
        b, i = divmod(j, self.rows)
        return self.blocks[b][i].to(FLOAT)

    def _basis(self) -> list[torch.Tensor]:
        """Blocks of q_0 .. q_{m-1}, each (rows, n)."""
        return [blk[: min(self.rows, self.m - b * self.rows)] for b, blk in enumerate(self.blocks)
                if b * self.rows < self.m]

    def _coefficients(self, blk: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """blk @ w in float64 for w (n,) or (n, k)."""
        if blk.dtype == FLOAT:
            return blk @ w
        return sum(blk[:, s: s + CHUNK].to(FLOAT) @ w[s: s + CHUNK] for s in range(0, self.n, CHUNK))

    def _subtract(self, w: torch.Tensor, blk: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """w - blk.T @ h for w (n,) or (n, k); in place, chunk by chunk, for float32 storage (no n-sized
        temporaries at scale)."""
        if blk.dtype == FLOAT:
            return w - blk.T @ h
        for s in range(0, self.n, CHUNK):
            w[s: s + CHUNK] -= blk[:, s: s + CHUNK].T.to(FLOAT) @ h
        return w

    def _orthogonalise(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Classical Gram-Schmidt against q_0 .. q_{m-1}, twice: (w projected off the basis, the coefficients
        removed, summed over both passes; length m). w is overwritten when the basis is stored in float32."""
        basis = self._basis()
        removed = torch.zeros(self.m, dtype=FLOAT, device=w.device)
        for _ in range(2):
            coefficients = summed(self.op, [self._coefficients(blk, w) for blk in basis])
            for b, (blk, h) in enumerate(zip(basis, coefficients)):
                w = self._subtract(w, blk, h)
                removed[b * self.rows: b * self.rows + h.numel()] += h
        return w, removed

    def step(self):
        """One Lanczos step: one HVP, alpha_j, beta_j, the column error of step j and the next basis vector."""
        j = self.m
        q = self._vector(j)
        w = matvec(self.op, q)
        self.alpha.append(dot(self.op, q, w))
        product_norm = norm(self.op, w)
        w, removed = self._orthogonalise(w)
        removed[j] -= self.alpha[j]
        if j > self.block_starts[-1]:
            removed[j - 1] -= self.beta[j - 1]
        self.defects.append(float(torch.linalg.vector_norm(removed)))
        self.product_norms.append(product_norm)
        beta = norm(self.op, w)
        scale = max(max(abs(a) for a in self.alpha), max(self.beta, default=0.0))
        if beta > BREAKDOWN_RTOL * scale and self.m < self.dim:
            self.beta.append(beta)
            self.defects[j] += beta * self._store(j + 1, w.div_(beta))  # H q_j - Q T e_j keeps its rounding
            return
        self.defects[j] += beta  # dropped: H q_j - Q T e_j keeps it
        self.beta.append(0.0)
        if self.m >= self.dim or self.gen is None:  # the basis spans the whole space (T_n is exact), or no restart
            self.exhausted = True
            return
        self.breakdowns += 1
        fresh, _ = self._orthogonalise(gaussian(self.op, self.gen, q.device))
        self.block_starts.append(j + 1)
        self.start_norms.append(norm(self.op, fresh))
        self.start_roundings.append(self._store(j + 1, fresh / self.start_norms[-1]))

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), eigenvectors S of T_m (m x m), residual bounds (see the module docstring)."""
        theta, S = _eigh_tridiagonal(np.asarray(self.alpha), np.asarray(self.beta[: self.m - 1]))
        residuals = np.abs(self.beta[-1] * S[-1, :]) + self.propagated_error(S) + self.floor(theta)
        return theta, S, residuals

    def propagated_error(self, S: np.ndarray) -> np.ndarray:
        """sum_j |S_ji| column_errors[j] >= ||E s_i||, per column i of S."""
        return np.abs(S).T @ np.asarray(self.column_errors)

    def floor(self, theta: np.ndarray) -> float:
        """10 m eps ||T|| (eps of the storage): the accuracy floor of computed Ritz values and residuals."""
        return 10 * self.m * torch.finfo(self.storage).eps * float(np.max(np.abs(theta)))

    def last_block(self) -> tuple[int, np.ndarray, float, float]:
        """(index b, Ritz values of T over block b, sum of log beta over its steps (-inf if it ended in a breakdown),
        the norm of the vector it started from) for the last block with at least one step. Its stored start
        differs from that vector's normalisation by start_roundings[b] in norm."""
        b = len(self.block_starts) - 1 if self.block_starts[-1] < self.m else len(self.block_starts) - 2
        start, stop = self.block_starts[b], self.block_starts[b + 1] if b + 1 < len(self.block_starts) else self.m
        theta, _ = _eigh_tridiagonal(np.asarray(self.alpha[start:stop]), np.asarray(self.beta[start: stop - 1]))
        betas = np.asarray(self.beta[start:stop])
        log_product = float(np.sum(np.log(betas))) if np.all(betas > 0) else -math.inf
        return b, theta, log_product, self.start_norms[b]

    def blocks_before(self, b: int) -> tuple[float, float] | None:
        """(min, max) Ritz value over the blocks before block b (invariant subspaces); None for b = 0."""
        if b == 0:
            return None
        stop = self.block_starts[b]
        theta, _ = _eigh_tridiagonal(np.asarray(self.alpha[:stop]), np.asarray(self.beta[: stop - 1]))
        return float(theta[0]), float(theta[-1])

    def ritz_vectors(self, S_cols: np.ndarray) -> torch.Tensor:
        """Q_m @ S[:, cols]: (n, len(cols)) float64 Ritz vectors (this rank's rows for a sharded operator)."""
        S_t = torch.as_tensor(S_cols, dtype=FLOAT, device=self.blocks[0].device)
        out = torch.zeros(self.n, S_t.shape[1], dtype=FLOAT, device=S_t.device)
        for b, blk in enumerate(self._basis()):
            out = self._subtract(out, blk, -S_t[b * self.rows: b * self.rows + blk.shape[0]])
        return out


def _eigh_tridiagonal(d: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(d) == 1:
        return d.copy(), np.ones((1, 1))
    return scipy.linalg.eigh_tridiagonal(d, e)
