"""What sharpness tracking adds to a training run's wall time, measured side by side with untracked runs.

At the demo shape (dim 64, 2 layers, 4 heads, seq 64, batch 16, 300 AdamW steps) the same run is trained without
tracking and with `--track-sharpness 25` under several settings, in turns (untracked, each tracked setting, ...)
for `--rounds` rounds in this one process; the medians give the overhead. Each tracked setting also reports what
its measurements cost and what they are worth: HVPs per measurement, the relative width of the reported
intervals, and the error of the last step's values against a converged float64 Lanczos (tol 1e-8) on the final
checkpoint. Writes its section of BENCHMARKS.md between the sharpness-tracking markers.
Usage: python benchmarks/tracking_overhead.py [--arch simplegpt] [--rounds 2] [--threads 1] [--out BENCHMARKS.md]
"""

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hessian_tools.benchmarks_md import write_section
from models.train import TrainConfig, read_metrics, train

SECTION = "sharpness-tracking"
DEMO = dict(dim=64, n_layers=2, n_heads=4, seq_len=64, batch_size=16, steps=300, warmup=30, save_every=0,
            norm_backend="torch", device="cpu")
GOAL = 0.30  # at most 30 % more wall time at EVERY = 25
SETTINGS = {  # name -> tracking settings (TrainConfig fields)
    "defaults (tol 1e-2, <= 20 steps, 1 x 8 seqs, float32)": dict(track_every=25),
    "defaults in float64": dict(track_every=25, track_dtype="float64"),
    "budget 4 steps, 1 x 4 seqs, float64": dict(track_every=25, track_hvps=4, track_batch_size=4,
                                                 track_dtype="float64"),
    "budget 3 steps, 1 x 2 seqs, float64": dict(track_every=25, track_hvps=3, track_batch_size=2,
                                                 track_dtype="float64"),
}


def timed_run(cfg: TrainConfig, root: Path, name: str) -> tuple[float, Path]:
    run_dir = root / name
    start = time.perf_counter()
    train(cfg, run_dir, progress=False)
    return time.perf_counter() - start, run_dir


def converged(run_dir: Path, cfg: TrainConfig) -> dict:
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


def quality(run_dir: Path, cfg: TrainConfig) -> dict:
    """HVPs per measurement, median relative interval width per measure, relative error of the last values."""
    lines = read_metrics(run_dir / "metrics.jsonl", kind="sharpness")
    steps = sorted({m["step"] for m in lines})
    truth = converged(run_dir, cfg)
    out = {"hvps_per_measurement": sum(m["hvp_count"] for m in lines) / len(steps), "measures": {}}
    for measure, value in truth.items():
        mine = [m for m in lines if m["measure"] == measure and m["status"] == "ok"]
        widths = [(m["interval"][1] - m["interval"][0]) / m["value"] if m["interval"][1] is not None else float("inf")
                  for m in mine]
        out["measures"][measure] = {"width": statistics.median(widths), "error_last": abs(mine[-1]["value"] - value)
                                    / value, "value_last": mine[-1]["value"], "converged": value,
                                    "steps": statistics.mean(m["lanczos_steps"] for m in mine)}
    return out


def section(arch, wall, results, load, rounds) -> str:
    where = (f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}; 1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end: a load "
             "above the core count means other processes shared the CPUs")
    base = statistics.median(wall["untracked"])
    lines = ["## Sharpness tracking during training", "",
             f"`python benchmarks/tracking_overhead.py` ({where}). {arch}, dim {DEMO['dim']}, {DEMO['n_layers']} "
             f"layers, seq {DEMO['seq_len']}, batch {DEMO['batch_size']}, {DEMO['steps']} AdamW steps, one checkpoint; "
             f"`--track-sharpness 25` measures lambda_max(H) and lambda_max(P^-1 H) at 13 steps (0 has no P). The runs "
             f"take turns, {rounds} rounds; median wall times. Goal: at most +{GOAL:.0%}. Steps: mean Lanczos steps "
             "per eigenvalue; width: median of (hi - lo) / value of the reported intervals (lower side certified, "
             "upper side failing with probability 1e-3; float32 intervals rest on the measured rounding, 4 more "
             "products each); error: the last step's value against float64 Lanczos to 1e-8 on the final checkpoint.",
             "", f"Untracked: {base:.1f} s.", "",
             "| tracking settings | wall time | overhead | goal | HVPs / measurement | lambda_max(H): steps, width, "
             "error | lambda_max(P^-1 H): steps, width, error |", "|---|---:|---:|---|---:|---|---|"]
    for name, q in results.items():
        t = statistics.median(wall[name])
        cells = []
        for measure in ("params.lambda_max", "adam.sharpness"):
            m = q["measures"][measure]
            cells.append(f"{m['steps']:.1f}, {m['width']:.2g}, {m['error_last']:.1e}")
        over = t / base - 1
        lines.append(f"| {name} | {t:.1f} s | {over:+.0%} | {'met' if over <= GOAL else 'missed'} | "
                     f"{q['hvps_per_measurement']:.1f} | {cells[0]} | {cells[1]} |")
    lines += ["", "The warm start makes the estimate accurate within a few steps (error column), not the guarantee: the "
              "upper side rests on the Gaussian part of the start alone (a stale vector must not hide a new top "
              "direction), so the width shrinks with the number of steps, as from a cold start "
              "(hessian_tools/estimators/guarantees.py)."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="simplegpt")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on shared cores more threads spin against other processes)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    configs = {"untracked": TrainConfig(arch=args.arch, **DEMO)}
    configs.update({name: TrainConfig(arch=args.arch, **DEMO, **s) for name, s in SETTINGS.items()})
    wall = {name: [] for name in configs}
    last_dirs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, cfg in configs.items():
                seconds, run_dir = timed_run(cfg, Path(tmp) / f"round{r}", name.replace(" ", "_").replace("/", "_"))
                wall[name].append(seconds)
                last_dirs[name] = run_dir
                print(f"round {r} {name}: {seconds:.1f} s", flush=True)
        results = {name: quality(last_dirs[name], configs[name]) for name in SETTINGS}
    text = section(args.arch, wall, results, (load_start, os.getloadavg()[0]), args.rounds)
    print(text)
    write_section(args.out, SECTION, text)


if __name__ == "__main__":
    main()
