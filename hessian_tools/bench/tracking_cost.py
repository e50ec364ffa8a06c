"""The "tracking" part: what sharpness tracking adds to a training run's wall time, and what it measures.

At the demo shape (dim 64, 2 layers, 4 heads, seq 64, batch 16, 300 AdamW steps) the same run is trained without
tracking and with `--track-sharpness 25` under several settings, in turns (untracked, each tracked setting, ...)
for `rounds` rounds; the medians of the rounds give the overhead. Each tracked setting also reports what its
measurements cost and what they are worth: HVPs per measurement, the median relative width of the reported
intervals, and the error of the last step's values against float64 Lanczos to tol 1e-8 on the final checkpoint
and the same batches.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

DEMO = dict(dim=64, n_layers=2, n_heads=4, seq_len=64, batch_size=16, steps=300, warmup=30, save_every=0,
            norm_backend="torch", device="cpu")
QUICK = dict(dim=16, n_layers=1, n_heads=2, seq_len=8, batch_size=4, steps=10, warmup=2, save_every=0,
             norm_backend="torch", device="cpu")
EVERY = {"full": 25, "quick": 5}
GOAL = 0.30  # at most 30 % more wall time at EVERY = 25
SETTINGS = {  # name -> tracking settings (TrainConfig fields besides track_every)
    "defaults (tol 1e-2, <= 20 steps, 1 x 8 seqs, float32)": dict(),
    "defaults in float64": dict(track_dtype="float64"),
    "budget 4 steps, 1 x 4 seqs, float64": dict(track_hvps=4, track_batch_size=4, track_dtype="float64"),
    "budget 3 steps, 1 x 2 seqs, float64": dict(track_hvps=3, track_batch_size=2, track_dtype="float64"),
}


def converged(run_dir: Path, cfg) -> dict:
    """{measure: lambda} at the final checkpoint: float64 Lanczos to tol 1e-8 on the tracking's batches."""
    from hessian_tools.estimators import lanczos
    from hessian_tools.operators import AdamPreconditioned, AdamState, ParamHessian
    from models.checkpoint import load_checkpoint
    from models.data import measurement_batches

    ckpt = load_checkpoint(run_dir)
    batches = measurement_batches(cfg.data_spec(), cfg.track_batches, cfg.track_batch_size, cfg.seq_len, seed=0)
    op = ParamHessian(ckpt.model, batches, dtype=torch.float64)
    return {"params.lambda_max": lanczos(op, tol=1e-8, max_iter=300).value,
            "adam.sharpness": lanczos(AdamPreconditioned(op, AdamState.from_checkpoint(ckpt)), tol=1e-8,
                                      max_iter=300).value}


def quality(run_dir: Path, cfg) -> dict:
    """HVPs per measurement; per measure: mean Lanczos steps, median (hi - lo) / value, the last value's error."""
    from models.train import read_metrics

    lines = read_metrics(run_dir / "metrics.jsonl", kind="sharpness")
    steps = sorted({m["step"] for m in lines})
    truth = converged(run_dir, cfg)
    out = {"measurements": len(steps), "hvps_per_measurement": sum(m["hvp_count"] for m in lines) / len(steps),
           "measures": {}}
    for measure, value in truth.items():
        mine = [m for m in lines if m["measure"] == measure and m["status"] == "ok"]
        widths = [(m["interval"][1] - m["interval"][0]) / m["value"] if m["interval"][1] is not None else None
                  for m in mine]
        finite = [w for w in widths if w is not None]
        out["measures"][measure] = {
            "width": statistics.median(finite) if len(finite) == len(widths) else None,
            "error_last": abs(mine[-1]["value"] - value) / value, "value_last": mine[-1]["value"],
            "converged": value, "steps": statistics.mean(m["lanczos_steps"] for m in mine)}
    return out


def run(quick: bool = False, arch: str = "simplegpt", rounds: int = 2, say=print) -> dict:
    """The part's result: the shape, wall times per round of every configuration, the tracked runs' quality."""
    from models.train import TrainConfig, train

    shape, every = (QUICK, EVERY["quick"]) if quick else (DEMO, EVERY["full"])
    configs = {"untracked": TrainConfig(arch=arch, **shape)}
    configs.update({name: TrainConfig(arch=arch, **shape, track_every=every, **s) for name, s in SETTINGS.items()})
    wall = {name: [] for name in configs}
    last = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(1 if quick else rounds):
            for i, (name, cfg) in enumerate(configs.items()):
                run_dir = Path(tmp) / f"round{r}" / f"config{i}"
                start = time.perf_counter()
                train(cfg, run_dir, progress=False)
                wall[name].append(time.perf_counter() - start)
                last[name] = run_dir
                say(f"tracking: round {r} {name}: {wall[name][-1]:.1f} s")
        tracked = {name: quality(last[name], configs[name]) for name in SETTINGS}
    return {"arch": arch, "shape": shape, "every": every, "rounds": 1 if quick else rounds, "goal": GOAL,
            "wall_s": wall, "tracked": tracked}
