"""Learning-rate sweeps: one short run per (arch, lr, seed), and the largest stable lr per architecture.

A run is stable when it completed (did not diverge, see models.train) and its final loss, the mean training
loss of its last max(1, steps // 10) steps, is below its initial loss (the loss of step 1). Per seed, the
largest stable lr is the largest lr tried whose run with that seed is stable. Over seeds, the architecture's
largest stable lr is the largest lr whose runs are stable for every seed. Either is a lower bound on the true
threshold when it is also the largest lr tried ("at_edge": true).
"""

import dataclasses
import json
from pathlib import Path

from hessian_tools.paths import output_dir, output_file, write_atomic
from models.train import METRICS_FILE, TrainConfig, read_metrics, train

SWEEP_FILE = "lr_sweep.json"


def run_dir_for(out, arch: str, lr: float, seed: int) -> Path:
    return Path(out) / arch / f"lr_{lr:g}" / f"seed_{seed}"


def summarize_run(run_dir: Path, status: str, steps: int) -> dict:
    """{"status", "initial_loss", "final_loss", "stable"} from a run's metrics."""
    losses = [m["loss"] for m in read_metrics(run_dir / METRICS_FILE)]
    tail = losses[-max(1, steps // 10):]
    initial = losses[0] if losses else None
    final = sum(tail) / len(tail) if status == "completed" and tail else None
    stable = status == "completed" and final is not None and final < initial
    return {"status": status, "initial_loss": initial, "final_loss": final, "stable": stable}


def thresholds(runs: list[dict], lrs: list[float], seeds: list[int]) -> dict:
    """The largest stable lr per seed and over all seeds (module docstring) from runs [{lr, seed, stable}]."""
    stable = {(r["lr"], r["seed"]) for r in runs if r["stable"]}
    per_seed = {str(s): max((lr for lr in lrs if (lr, s) in stable), default=None) for s in seeds}
    best = max((lr for lr in lrs if all((lr, s) in stable for s in seeds)), default=None)
    found = [v for v in per_seed.values() if v is not None]
    return {"largest_stable_lr": best, "at_edge": best == lrs[-1], "per_seed": per_seed,
            "per_seed_min": min(found) if len(found) == len(seeds) else None,
            "per_seed_max": max(found) if found else None}


def lr_sweep(archs, lrs, out, base: TrainConfig, seeds=None, progress: bool = False) -> dict:
    """Train (or reuse) out/{arch}/lr_{lr}/seed_{seed}/ for every triple (seeds default: [base.seed]); write
    out/lr_sweep.json and return its record: {"criterion", "settings", "seeds", "lrs", "archs": {arch: {"runs":
    [{lr, seed, status, initial_loss, final_loss, stable}], "largest_stable_lr", "at_edge", "per_seed",
    "per_seed_min", "per_seed_max"}}}. A finished run is reported as recorded, not retrained."""
    lrs = sorted(set(float(lr) for lr in lrs))
    output_file(output_dir(out, "--out") / SWEEP_FILE, "--out")  # before training for minutes
    seeds = [base.seed] if seeds is None else sorted(set(int(s) for s in seeds))
    record = {"criterion": " ".join(__doc__.split("\n\n")[1].split()),
              "settings": {k: v for k, v in base.to_dict().items() if k not in ("arch", "lr", "seed")},
              "seeds": seeds, "lrs": lrs, "archs": {}}
    for arch in archs:
        runs = []
        for lr in lrs:
            for seed in seeds:
                cfg = dataclasses.replace(base, arch=arch, lr=lr, seed=seed)
                result = train(cfg, run_dir_for(out, arch, lr, seed), progress=progress)
                runs.append({"lr": lr, "seed": seed, **summarize_run(result.run_dir, result.status, cfg.steps)})
        record["archs"][arch] = {"runs": runs, **thresholds(runs, lrs, seeds)}
    write_atomic(Path(out) / SWEEP_FILE, json.dumps(record, indent=1), "--out")
    return record


def format_table(record: dict) -> str:
    """A plain-text table: one row per (arch, lr, seed), then the largest stable lr per arch (over seeds and each)."""
    lines = [f"{'arch':<16}{'lr':>10}{'seed':>6}{'status':>11}{'initial':>10}{'final':>10}  stable"]
    fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    lr = lambda x: "none" if x is None else f"{x:g}"  # noqa: E731
    for arch, entry in record["archs"].items():
        for r in entry["runs"]:
            lines.append(f"{arch:<16}{r['lr']:>10g}{r['seed']:>6}{r['status']:>11}{fmt(r['initial_loss']):>10}"
                         f"{fmt(r['final_loss']):>10}  {'yes' if r['stable'] else 'no'}")
    for arch, entry in record["archs"].items():
        note = " (the largest tried: a lower bound)" if entry["at_edge"] else ""
        seeds = ", ".join(f"seed {s}: {lr(v)}" for s, v in entry["per_seed"].items())
        lines.append(f"largest stable lr for {arch}: {lr(entry['largest_stable_lr'])} for every seed{note}; "
                     f"{seeds}")
    return "\n".join(lines)
