"""Trace estimators with standard errors: Hutchinson (optionally stopping on its standard error) and Hutch++.

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


def hutchpp_trace(op, n_matvecs: int = 102, seed: int = 0, distribution: str = "rademacher") -> Estimate:
    """tr(H) by Hutch++ (Meyer, Musco, Musco, Woodruff 2021) with s = n_matvecs // 3 (cost 3 s HVPs).

    Q = orth(H S) for s probes S; tr(H) = tr(Q^T H Q) + tr((I - QQ^T) H (I - QQ^T)), the second term by
    Hutchinson on s probes projected off Q. The standard error is that of the Hutchinson part (the first
    term is exact). Returns an Estimate: value = trace, error = standard error; payload: low_rank_part,
    residual_part, residual_samples, rank.
    """
    c.dimension(op)  # UserError unless op is square
    n_matvecs = c.positive_int("n_matvecs", n_matvecs, low=6)
    s = n_matvecs // 3
    gen = c.generator(seed)
    settings = {"method": "hutch++", "n_matvecs": n_matvecs, "distribution": distribution, "seed": seed,
                "operator": c.operator_settings(op)}
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
