"""What the Lanczos intervals promise and what they cost, measured side by side in one run.

1. Coverage and tightness of the probabilistic upper bound on synthetic spectra with a known lambda_max: runs
   stopped early (12 steps) so the upper side matters, 300 random starts per failure probability. Tightness is
   (hi - theta_1) / (lambda_max - theta_1): how many times the bound's upper side exceeds the true error (which
   is quadratic in the residual r_1 once lambda_max is isolated, while any gap-free bound is linear in it); the
   last column is (hi - theta_1) / r_1.
2. HVPs of the interval stop (lanczos's convergence: the interval within tol * |theta|) against the residual stop
   the code used before (the top Ritz pair's residual within tol * |theta|), on the tests' tiny GPTs (one layer,
   dim 16) at init, cold and warm-started from a nearby operator (weights scaled by 1 + 1e-2 N(0, 1)).
3. The float32 products' relative rounding ||H32 q - H64 q|| / ||H64 q|| at each of 20 Lanczos vectors against
   its value at the first one, where lanczos measures it (5 tiny GPTs x 4 seeds): the largest ratio sets
   guarantees.ROUNDING_SAFETY.
Usage: python benchmarks/lanczos_guarantees.py [--trials 300]
"""

import argparse
import copy
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import DenseOperator, symmetric_with_spectrum  # noqa: E402
from operator_refs import ARCHS, tiny_gpt, token_batches  # noqa: E402

from hessian_tools.estimators import lanczos  # noqa: E402
from hessian_tools.estimators.guarantees import ROUNDING_SAFETY  # noqa: E402
from hessian_tools.estimators.krylov import KrylovBasis  # noqa: E402
from hessian_tools.operators import ParamHessian  # noqa: E402

SPECTRA = {
    "small gap, graded bulk": np.concatenate([[1.0], 0.99 - np.geomspace(1e-3, 1.0, 79)]),
    "gap 0.1 over [-1, 1]": np.concatenate([[2.0, 1.9], np.linspace(-1.0, 1.0, 78)]),
    "4-cluster over 2e-6": np.concatenate([1.0 - 2e-6 * np.linspace(0, 1, 4), np.linspace(-1.0, 0.0, 76)]),
}


def coverage(trials: int):
    print("| spectrum | failure probability | held | median tightness | 90th percentile | median width / residual |")
    print("|---|---|---|---|---|---|")
    for name, eigs in SPECTRA.items():
        for delta in (0.5, 0.05, 1e-3):
            held, ratios, widths = 0, [], []
            for t in range(trials):
                est = lanczos(DenseOperator(symmetric_with_spectrum(eigs, seed=t)), tol=1e-12, max_iter=12, seed=t,
                              failure_probability=delta)
                lo, hi = est.payload["interval"]
                held += lo <= eigs.max() <= hi
                ratios.append((hi - est.value) / max(eigs.max() - est.value, 1e-300))
                widths.append((hi - est.value) / est.payload["residuals"][0])
            print(f"| {name} | {delta:g} | {held}/{trials} | {np.median(ratios):.3g} | {np.percentile(ratios, 90):.3g} "
                  f"| {np.median(widths):.3g} |")


def residual_stop(op, v0, tol, steps):
    """The step at which the top Ritz pair's residual first fell within tol * |theta| (the old stop)."""
    basis = KrylovBasis(op, v0, steps)
    while basis.m < steps:
        basis.step()
        theta, _, res = basis.ritz()
        if res[-1] <= tol * abs(theta[-1]):
            return basis.m
    return None


def costs():
    print("\n| arch | tol | old stop (cold) | interval stop (cold) | interval stop (warm) | error / |lambda| |")
    print("|---|---|---|---|---|---|")
    for arch in ARCHS:
        model, batches = tiny_gpt(arch), token_batches((2, 1))
        nearby = copy.deepcopy(model)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in nearby.parameters():
                p.mul_(1 + 1e-2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        previous = lanczos(ParamHessian(model, batches, dtype=torch.float64, mode="rev-rev"), tol=1e-8,
                           return_vectors=True).vectors[:, 0]
        op = ParamHessian(nearby, batches, dtype=torch.float64, mode="rev-rev")
        for tol in (1e-3, 1e-6):
            start = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            old = residual_stop(op, start, tol, 200)
            cold = lanczos(op, tol=tol)
            warm = lanczos(op, tol=tol, v0=previous)
            print(f"| {arch} | {tol:g} | {old} | {cold.hvp_count} | {warm.hvp_count} | "
                  f"{cold.error / abs(cold.value):.1e} |")


def rounding_along_the_run(steps: int = 20, seeds: int = 4):
    print(f"\n| arch | seed | relative rounding at q_0 | largest over {steps} vectors | ratio |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for arch in ARCHS:
        for seed in range(seeds):
            op = ParamHessian(*_tiny(arch, seed), dtype=torch.float32)
            exact = op.with_dtype(torch.float64)
            basis = KrylovBasis(op, torch.randn(op.shape[0], generator=torch.Generator().manual_seed(seed),
                                                dtype=torch.float64), steps)
            for _ in range(steps):
                basis.step()
            rel = []
            for j in range(steps):
                q = basis._vector(j)
                h = exact.matvec(q).double()
                rel.append(float(torch.linalg.vector_norm(op.matvec(q).double() - h) / torch.linalg.vector_norm(h)))
            worst = max(worst, max(rel) / rel[0])
            print(f"| {arch} | {seed} | {rel[0]:.2e} | {max(rel):.2e} | {max(rel) / rel[0]:.2f} |")
    print(f"\nlargest ratio {worst:.2f}; ROUNDING_SAFETY = {ROUNDING_SAFETY:g}")


def _tiny(arch, seed):
    return tiny_gpt(arch, seed=seed), token_batches((2, 1), seed=seed + 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.2f}")
    coverage(args.trials)
    costs()
    rounding_along_the_run()


if __name__ == "__main__":
    main()
