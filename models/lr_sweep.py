"""Learning-rate sweeps: one short run per (arch, lr), and the largest stable lr per architecture.

A run is stable when it completed (did not diverge, see models.train) and its final loss, the mean training
loss of its last max(1, steps // 10) steps, is below its initial loss (the loss of step 1). The largest
stable lr is a lower bound on the true threshold when it is also the largest lr tried ("at_edge": true).
"""

import dataclasses
import json
from pathlib import Path

from hessian_tools.paths import output_dir, output_file, write_atomic
from models.train import METRICS_FILE, TrainConfig, read_metrics, train

SWEEP_FILE = "lr_sweep.json"


def run_dir_for(out, arch: str, lr: float) -> Path:
    return Path(out) / arch / f"lr_{lr:g}"


def summarize_run(run_dir: Path, status: str, steps: int) -> dict:
    """{"status", "initial_loss", "final_loss", "stable"} from a run's metrics."""
    losses = [m["loss"] for m in read_metrics(run_dir / METRICS_FILE)]
    tail = losses[-max(1, steps // 10):]
    initial = losses[0] if losses else None
    final = sum(tail) / len(tail) if status == "completed" and tail else None
    stable = status == "completed" and final is not None and final < initial
    return {"status": status, "initial_loss": initial, "final_loss": final, "stable": stable}


def lr_sweep(archs, lrs, out, base: TrainConfig, progress: bool = False) -> dict:
    """Train (or reuse) out/{arch}/lr_{lr}/ for every pair; write out/lr_sweep.json and return its record:
    {"criterion", "settings", "archs": {arch: {"runs": [{lr, status, initial_loss, final_loss, stable}],
    "largest_stable_lr", "at_edge"}}}."""
    lrs = sorted(set(float(lr) for lr in lrs))
    output_file(output_dir(out, "--out") / SWEEP_FILE, "--out")  # before training for minutes
    record = {"criterion": __doc__.split("\n\n")[1].replace("\n", " "),
              "settings": {k: v for k, v in base.to_dict().items() if k not in ("arch", "lr")}, "archs": {}}
    for arch in archs:
        runs = []
        for lr in lrs:
            cfg = dataclasses.replace(base, arch=arch, lr=lr)
            result = train(cfg, run_dir_for(out, arch, lr), progress=progress)
            runs.append({"lr": lr, **summarize_run(result.run_dir, result.status, cfg.steps)})
        stable = [r["lr"] for r in runs if r["stable"]]
        best = max(stable) if stable else None
        record["archs"][arch] = {"runs": runs, "largest_stable_lr": best, "at_edge": best == lrs[-1]}
    write_atomic(Path(out) / SWEEP_FILE, json.dumps(record, indent=1), "--out")
    return record


def format_table(record: dict) -> str:
    """A plain-text table: one row per (arch, lr), then the largest stable lr per arch."""
    lines = [f"{'arch':<16}{'lr':>10}{'status':>11}{'initial':>10}{'final':>10}  stable"]
    fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    for arch, entry in record["archs"].items():
        for r in entry["runs"]:
            lines.append(f"{arch:<16}{r['lr']:>10g}{r['status']:>11}{fmt(r['initial_loss']):>10}"
                         f"{fmt(r['final_loss']):>10}  {'yes' if r['stable'] else 'no'}")
    for arch, entry in record["archs"].items():
        best = entry["largest_stable_lr"]
        note = " (the largest tried: a lower bound)" if entry["at_edge"] else ""
        lines.append(f"largest stable lr for {arch}: {'none' if best is None else f'{best:g}'}{note}")
    return "\n".join(lines)
