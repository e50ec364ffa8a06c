"""Trace estimators: Hutchinson (optionally stopping on its standard error) and Hutch++ with standard errors,
XTrace with the paper's error estimate (not a standard error; see xtrace_trace).

Probes z have E[z z^T] = I, so z^T H z is an unbiased sample of tr(H); the standard error is the sample
standard deviation (ddof=1) over sqrt(#samples). Probes come in blocks of `block_size` through op.matmat;
the seed and block size fix them. A sharded operator (`_common`) gets the same probes, cut to each rank's rows.
"""

from __future__ import annotations

import math
import time

import torch

from hessian_tools.estimators import _common as c
from hessian_tools.records import Estimate

MIN_SAMPLES_BEFORE_STOP = 10  # a standard error from fewer samples is too noisy to stop on


def hutchinson_trace(op, n_samples: int = 100, seed: int = 0, target_std_error: float | None = None,
                     max_samples: int | None = None, distribution: str = "rademacher",
                     block_size: int = 8) -> Estimate:
    """tr(H) by Hutchinson: the mean of z^T H z over probes, with its standard error.

    Without target_std_error: exactly n_samples probes (cost n_samples HVPs). With it: blocks of probes
    until the standard error is <= target_std_error (after at least 10 samples) or max_samples
    (default 10 * n_samples) are spent; converged says whether the target was met.
    Returns an Estimate: value = trace, error = standard error; payload: samples, n_samples, mean_diagonal
    (trace / n).
    """
    n = c.dimension(op)
    n_samples = c.positive_int("n_samples", n_samples, low=2)
    block_size = c.positive_int("block_size", block_size)
    if target_std_error is not None:
        target_std_error = c.positive_float("target_std_error", target_std_error)
    max_samples = 10 * n_samples if max_samples is None else c.positive_int("max_samples", max_samples, low=2)
    limit = n_samples if target_std_error is None else max_samples
    gen = c.generator(seed)
    settings = {"method": "hutchinson", "n_samples": n_samples, "target_std_error": target_std_error,
                "max_samples": max_samples, "distribution": distribution, "block_size": block_size, "seed": seed,
                "operator": c.operator_settings(op)}
    start, hvp0 = time.perf_counter(), op.hvp_count
    samples: list[float] = []
    converged = target_std_error is None
    try:
        while len(samples) < limit:
            Z = c.probes(op, gen, min(block_size, limit - len(samples)), distribution)
            samples += c.summed(op, (Z * c.matmat(op, Z)).sum(dim=0)).tolist()
            if target_std_error is not None and len(samples) >= MIN_SAMPLES_BEFORE_STOP:
                if _std_error(samples) <= target_std_error:
                    converged = True
                    break
    except c.NonFiniteProduct as exc:
        return Estimate("trace", None, None, "standard-error", False, op.hvp_count - hvp0,
                        time.perf_counter() - start, settings, status=f"failed after {len(samples)} samples: {exc}")
    mean = sum(samples) / len(samples)
    payload = {"samples": samples, "n_samples": len(samples), "mean_diagonal": mean / n}
    return Estimate("trace", mean, _std_error(samples), "standard-error", converged, op.hvp_count - hvp0,
                    time.perf_counter() - start, settings, payload=payload)


def _std_error(samples: list[float]) -> float:
    t = torch.tensor(samples, dtype=torch.float64)
    return float(t.std(unbiased=True)) / math.sqrt(len(samples))


def _sketch_setup(op, method: str, n_matvecs, per_probe: int, seed: int, distribution: str):
    """(s, generator, settings) of a sketching estimator spending per_probe products per probe:
    s = n_matvecs // per_probe >= 2 probes."""
    c.dimension(op)  # UserError unless op is square
    n_matvecs = c.positive_int("n_matvecs", n_matvecs, low=2 * per_probe)
    settings = {"method": method, "n_matvecs": n_matvecs, "distribution": distribution, "seed": seed,
                "operator": c.operator_settings(op)}
    return n_matvecs // per_probe, c.generator(seed), settings


def hutchpp_trace(op, n_matvecs: int = 102, seed: int = 0, distribution: str = "rademacher") -> Estimate:
    """tr(H) by Hutch++ (Meyer, Musco, Musco, Woodruff 2021) with s = n_matvecs // 3 (cost 3 s HVPs).

    Q = orth(H S) for s probes S; tr(H) = tr(Q^T H Q) + tr((I - QQ^T) H (I - QQ^T)), the second term by
    Hutchinson on s probes projected off Q. The standard error is that of the Hutchinson part (the first
    term is exact). Returns an Estimate: value = trace, error = standard error; payload: low_rank_part,
    residual_part, residual_samples, rank.
    """
    s, gen, settings = _sketch_setup(op, "hutch++", n_matvecs, 3, seed, distribution)
    start, hvp0 = time.perf_counter(), op.hvp_count
    try:
        S = c.probes(op, gen, s, distribution)
        G = c.probes(op, gen, s, distribution)
        Q = c.orthonormal_columns(op, c.matmat(op, S))
        low_rank = float(c.summed(op, torch.trace(Q.T @ c.matmat(op, Q))))
        G = G - Q @ c.summed(op, Q.T @ G)
        samples = c.summed(op, (G * c.matmat(op, G)).sum(dim=0))
    except c.NonFiniteProduct as exc:
        return Estimate("trace", None, None, "standard-error", False, op.hvp_count - hvp0,
                        time.perf_counter() - start, settings, status=f"failed: {exc}")
    residual = float(samples.mean())
    payload = {"low_rank_part": low_rank, "residual_part": residual, "residual_samples": samples.tolist(),
               "rank": Q.shape[1]}
    return Estimate("trace", low_rank + residual, _std_error(samples.tolist()), "standard-error", True,
                    op.hvp_count - hvp0, time.perf_counter() - start, settings, payload=payload)


RANK_RTOL = 1e-12  # singular values of A Omega below this times the largest are taken as zero (rank deficiency)


def xtrace_trace(op, n_matvecs: int = 102, seed: int = 0, distribution: str = "rademacher") -> Estimate:
    """tr(H) by XTrace (Epperly, Tropp, Webber 2024) with s = n_matvecs // 2 probes (at most 2 s HVPs).

    For a symmetric (indefinite) H: Y = H Omega for s probes, and for each i the leave-one-out basis
    Q_i = orth(Y without column i) gives t_i = tr(Q_i^T H Q_i) + w_i^T (I - Q_i Q_i^T) H (I - Q_i Q_i^T) w_i,
    unbiased because Q_i does not depend on the probe w_i. The value is the mean of the s t_i. One QR of Y
    and one block H Q serve every i: Q_i Q_i^T = Q (I - d_i d_i^T) Q^T with d_i the normalized i-th column
    of R^-T (rank-one downdates, O(n s^2) in all). When Y has numerical rank r < s (singular values below
    RANK_RTOL times the largest), every Q_i spans the same r-dimensional range (probes in general position) and
    the basis costs r HVPs: for rank(H) < s the answer is exact up to rounding.

    error = std(t_i, ddof=1) / sqrt(s), the paper's error estimate. The t_i share their probes, so it is not a
    standard error, and it is too small: on 300 random 60 x 60 symmetric matrices per spectrum at n_matvecs = 40
    (tests/test_xtrace.py), value +- error held tr(H) in 60 % of trials for a decaying spectrum and 45 % for a
    flat one, value +- 2 error in 88 % and 78 % (a standard error: 67 % and 94 %); error_kind "estimate".
    Returns an Estimate; payload: loo_estimates (the t_i), rank (r), low_rank_part (tr(Q^T H Q)),
    sketch_frobenius_share (||H Q||_F^2 over ||Y||_F^2 / s, an unbiased estimate of ||H||_F^2 = tr(H^2): the
    share of it the sketch holds, near 1 when the spectrum decays within s directions, about s / n when flat).
    """
    s, gen, settings = _sketch_setup(op, "xtrace", n_matvecs, 2, seed, distribution)
    start, hvp0 = time.perf_counter(), op.hvp_count
    try:
        Omega = c.probes(op, gen, s, distribution)
        Y = c.matmat(op, Omega)
        B, sigma, Vt = _range_basis(op, Y)
        rank = B.shape[1]
        Z = c.matmat(op, B) if rank else torch.zeros_like(B)
    except c.NonFiniteProduct as exc:
        return Estimate("trace", None, None, "estimate", False, op.hvp_count - hvp0,
                        time.perf_counter() - start, settings, status=f"failed: {exc}")
    loo = _xtrace_leave_one_out(op, Omega, Y, B, Z, sigma, Vt, rank)
    payload = {"loo_estimates": loo.tolist(), "rank": rank,
               "low_rank_part": float(c.summed(op, torch.trace(B.T @ Z))),
               "sketch_frobenius_share": float(c.summed(op, Z.square().sum()) / (c.summed(op, Y.square().sum()) / s))}
    return Estimate("trace", float(loo.mean()), float(loo.std()) / math.sqrt(s), "estimate", True,
                    op.hvp_count - hvp0, time.perf_counter() - start, settings, payload=payload)


def _range_basis(op, Y: torch.Tensor):
    """(B, sigma, Vt): Y = Q R, R = U diag(sigma) Vt, and B = Q U[:, :r] an orthonormal basis of range(Y), r the
    number of singular values above RANK_RTOL times the largest (rows: this rank's, for a sharded op)."""
    Q = c.orthonormal_columns(op, Y)
    R = c.summed(op, Q.T @ Y)
    U, sigma, Vt = torch.linalg.svd(R, full_matrices=False)
    rank = int((sigma > RANK_RTOL * sigma[0]).sum()) if sigma[0] > 0 else 0
    return Q @ U[:, :rank], sigma, Vt


def _xtrace_leave_one_out(op, Omega, Y, B, Z, sigma, Vt, rank: int) -> torch.Tensor:
    """The s leave-one-out estimates t_i from one basis B (n, r) of range(Y) and Z = H B.

    With W = B^T Omega, G = B^T Y, T = B^T H B, and d_i the unit vector in B's coordinates orthogonal to
    every column of Y but the i-th (d_i = Sigma^-1 V^T e_i normalized, from R = U Sigma V^T; none when r < s):
    the probe's residual is r_i = w_i - B (W_i - c_i d_i) with c_i = d_i^T W_i, and expanding r_i^T H r_i by
    H w_i = Y_i and H B = Z (H symmetric) gives, with d = d_i, c = c_i,
    t_i = tr T - d^T T d + w_i^T Y_i - 2 W_i^T G_i + 2 c d^T G_i + W_i^T T W_i - 2 c d^T T W_i + c^2 d^T T d.
    """
    T = c.summed(op, B.T @ Z)
    T = (T + T.T) / 2
    W, G = c.summed(op, [B.T @ Omega, B.T @ Y])
    quad = c.summed(op, (Omega * Y).sum(dim=0))  # w_i^T H w_i
    TW = T @ W
    loo = torch.trace(T) + quad - 2 * (W * G).sum(dim=0) + (W * TW).sum(dim=0)
    if rank == Omega.shape[1]:
        D = Vt / sigma[:, None]
        D = D / D.norm(dim=0)
        cw, dTd = (D * W).sum(dim=0), (D * (T @ D)).sum(dim=0)
        loo = loo - dTd + 2 * cw * (D * G).sum(dim=0) - 2 * cw * (D * TW).sum(dim=0) + cw.square() * dTd
    return loo
