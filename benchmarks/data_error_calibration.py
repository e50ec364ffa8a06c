"""Calibration of the data error bars, and what they cost on a real model (prints JSON lines to stdout).

1. Synthetic population with known truth (tests/test_data_error.py's `Population`): coverage of nominal 68 %
   jackknife intervals (8 groups of one batch) for lambda_max, lambda_min and the trace, against the union
   estimate +- the same interval width without bias correction and the old "union +- std / sqrt(2) over two
   halves", over --trials draws.
2. A dim-16 simplegpt (2 layers, context 32; at init and after --train-steps of training on the embedded
   corpus), parameter Hessian in float64, measurement batches of 8 sequences from the held-out split: the
   union lambda_max, the jackknife value, interval, bias and HVP cost over 8 groups (warm-started, and cold
   for comparison), and the sample-size curve over 32 batches.
Usage: python benchmarks/data_error_calibration.py [--trials 1000] [--train-steps 300] [--skip-synthetic]
       [--skip-model]
"""

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hessian_tools.estimators import hutchpp_trace, jackknife, lanczos, sample_size_curve  # noqa: E402
from hessian_tools.operators import ParamHessian  # noqa: E402
from models.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from models.data import load_splits  # noqa: E402
from models.gpt import build_model  # noqa: E402
from models.train import train  # noqa: E402
from models.train_config import TrainConfig  # noqa: E402

MODEL = dict(arch="simplegpt", dim=16, n_layers=2, n_heads=2, seq_len=32)


def synthetic(trials: int) -> dict:
    from helpers import DenseOperator
    from test_data_error import POPULATION, two_halves_interval

    def mean_operator(batches):
        return DenseOperator(np.mean(batches, axis=0))

    ev = POPULATION.eigenvalues
    quantities = {"lambda_max": (functools.partial(lanczos, tol=1e-6), ev[-1]),
                  "lambda_min": (functools.partial(lanczos, which="smallest", tol=1e-6), ev[0]),
                  "trace": (functools.partial(hutchpp_trace, n_matvecs=3 * POPULATION.n), ev.sum())}
    rng = np.random.default_rng(100)
    draws = [POPULATION.batches(rng, 8) for _ in range(trials)]
    out = {"trials": trials, "population": {"n": POPULATION.n, "samples_per_batch": POPULATION.m,
                                            "top_eigenvalues": ev[-3:].tolist(), "bottom_eigenvalues": ev[:3].tolist()}}
    for name, (estimator, truth) in quantities.items():
        recs = [jackknife(mean_operator, b, estimator, combine="rebuild") for b in draws]
        inside = [r.payload["interval"][0] <= truth <= r.payload["interval"][1] for r in recs]
        uncorrected = [abs(r.payload["union_value"] - truth) <= r.payload["t_quantile"] * r.error for r in recs]
        out[name] = {"truth": float(truth), "jackknife_coverage": float(np.mean(inside)),
                     "uncorrected_coverage": float(np.mean(uncorrected)),
                     "union_bias": float(np.mean([r.payload["union_value"] for r in recs]) - truth),
                     "corrected_bias": float(np.mean([r.value for r in recs]) - truth),
                     "flagged": float(np.mean([r.payload["warning"] is not None for r in recs])),
                     "flagged_coverage": _mean([h for h, r in zip(inside, recs) if r.payload["warning"]]),
                     "unflagged_coverage": _mean([h for h, r in zip(inside, recs) if not r.payload["warning"]])}
    halves = [two_halves_interval(b) for b in draws]
    out["lambda_max"]["two_halves_coverage"] = float(np.mean([lo <= ev[-1] <= hi for lo, hi in halves]))
    return out


def _mean(xs):
    return float(np.mean(xs)) if xs else None


def real_model(train_steps: int) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for steps in (0, train_steps):
            ckpt = _checkpoint(Path(tmp) / f"run{steps}", steps)
            batches = ckpt.measurement_batches(32, 8, seed=0)
            model = ckpt.model.double()
            make_op = functools.partial(ParamHessian, model, dtype=torch.float64, mode="double-backward")
            solve = functools.partial(lanczos, tol=1e-6)
            start = time.perf_counter()
            warm = jackknife(make_op, batches[:8], solve)
            warm_s = time.perf_counter() - start
            cold = jackknife(make_op, batches[:8], lambda op: solve(op))  # hides v0: every solve from random
            curve = sample_size_curve(make_op, batches, solve, n_groups=8)
            p = warm.payload
            results.append({
                "train_steps": steps, "n_params": make_op(batches[:1]).shape[0], "batch": [8, MODEL["seq_len"]],
                "union_value": p["union_value"], "jackknife_value": warm.value, "standard_error": warm.error,
                "interval_68": p["interval"], "bias": p["bias"], "bias_to_standard_error": p["bias_to_standard_error"],
                "leave_one_out_values": p["leave_one_out_values"],
                "solver_error_propagated": p["solver_error_propagated"],
                "hvp_cost_warm": p["hvp_cost"], "hvp_cost_cold": cold.payload["hvp_cost"], "wall_s_warm": warm_s,
                "combination": p["operators"], "warning": p["warning"],
                "curve": [{"n_batches": q["n_batches"], "value": q["value"],
                           "jackknife": None if q["jackknife"] is None else
                           {"value": q["jackknife"]["value"], "error": q["jackknife"]["error"],
                            "interval": q["jackknife"]["payload"]["interval"]}} for q in curve.payload["points"]]})
    return results


def _checkpoint(run_dir: Path, steps: int):
    cfg = TrainConfig(**MODEL, steps=max(steps, 1), save_every=0, device="cpu", norm_backend="torch", batch_size=16)
    if steps == 0:
        splits = load_splits(cfg.data_spec())
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model_config(splits.tokenizer.vocab_size))
        meta = {"data": cfg.data_spec().to_dict(), "tokenizer": splits.tokenizer.to_dict()}
        return load_checkpoint(save_checkpoint(run_dir, 0, model, None, meta))
    train(cfg, run_dir, progress=False)
    return load_checkpoint(run_dir)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.skip_synthetic:
        print(json.dumps({"synthetic": synthetic(args.trials)}), flush=True)
    for result in [] if args.skip_model else real_model(args.train_steps):
        print(json.dumps({"real_model": result}), flush=True)


if __name__ == "__main__":
    main()
