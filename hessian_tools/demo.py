"""The end-to-end experiment behind `hessian-tools demo`, `hessian-tools figures` and the notebooks.

An experiment at a named scale lives in one directory ROOT:
  ROOT/runs/{arch}/        one training run per architecture (models.train), checkpoints every save_every steps;
  ROOT/lr_sweep/           the learning-rate sweep (models.lr_sweep): ROOT/lr_sweep/{arch}/lr_{lr}/, lr_sweep.json;
  ROOT/results.jsonl       the sweep records (hessian_tools.sweep): params, activation and density at every
                           checkpoint, the bound (theory.verify) and Adam's sharpness at the last one.
Every step reuses what is there: a completed or diverged run is not retrained, a measured unit not remeasured,
so a second call (or a call after an interruption) only does what is missing. Independent tasks (runs, sweeps
of different runs) go to `jobs` worker processes of one thread each; the results file takes concurrent appends.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from hessian_tools.errors import UserError
from models.config import ARCHS


@dataclass(frozen=True)
class Scale:
    """Sizes of one experiment: train = TrainConfig fields (besides arch), lrs / lr_steps = the lr sweep,
    sweep = SweepSettings fields shared by every measure."""

    name: str
    train: dict
    lrs: tuple
    lr_steps: int
    sweep: dict
    archs: tuple = ARCHS


_SWEEP_TINY = dict(n_batches=2, batch_size=2, tol=1e-3, n_groups=2, density_probes=2, density_iter=12,
                   density_grid=(-20.0, 80.0, 201), density_width=2.0, trace_matvecs=12)
SCALES = {
    # the test scale: dim 16, 1 layer, 20 steps, 2 checkpoints
    "tiny": Scale("tiny", dict(dim=16, n_layers=1, n_heads=2, seq_len=8, batch_size=4, steps=20, save_every=10,
                               warmup=2, lr=1e-2), (1e-2, 3e-1), 10, _SWEEP_TINY),
    # the notebooks' default when no results are given: a few minutes on 2 cores
    "small": Scale("small", dict(dim=32, n_layers=2, n_heads=4, seq_len=32, batch_size=8, steps=120, save_every=40,
                                 warmup=12, lr=3e-3), (3e-2, 0.3, 1.0), 40,
                   dict(n_batches=2, batch_size=4, tol=1e-3, n_groups=2, density_probes=3, density_iter=30)),
    # the demo and the committed figures: dim 64, 2 layers, 300 steps
    "full": Scale("full", dict(dim=64, n_layers=2, n_heads=4, seq_len=64, batch_size=16, steps=300, save_every=75,
                               warmup=30, lr=3e-3), (3e-2, 1e-1, 0.2, 0.4, 0.7, 1.0), 80,
                  dict(n_batches=2, batch_size=4, tol=1e-3, n_groups=2, density_probes=3, density_iter=40,
                       density_grid=(-30.0, 120.0, 1501), density_width=0.3)),
}
DEFAULT_ROOT = Path("demo_runs")


def _worker_init():
    import torch

    torch.set_num_threads(1)


def _train_task(settings: dict, run_dir: str) -> tuple:
    from models.train import TrainConfig, train

    start = time.perf_counter()
    result = train(TrainConfig(**settings), run_dir, progress=False)
    return run_dir, result.status, result.step, time.perf_counter() - start


def _sweep_task(run_dir: str, out: str, settings) -> dict:
    from hessian_tools.sweep import sweep

    return sweep([run_dir], out, settings, progress=False)


@dataclass
class Experiment:
    """One experiment: `scale` (a SCALES name) in `root` (default demo_runs/{scale}); `jobs` worker processes
    (0 = up to 2); `archs` (default all five); `steps` replaces the scale's training steps (checkpoints then
    every steps // 3)."""

    scale: str = "full"
    root: Path | None = None
    jobs: int = 0
    archs: tuple | None = None
    steps: int | None = None
    log: object = field(default=None, repr=False)

    def __post_init__(self):
        if self.scale not in SCALES:
            raise UserError(f"unknown scale {self.scale!r}; choose one of {', '.join(SCALES)}")
        self.root = Path(self.root) if self.root is not None else DEFAULT_ROOT / self.scale
        self.jobs = self.jobs or min(2, os.cpu_count() or 1)
        self.archs = tuple(self.archs or SCALES[self.scale].archs)
        unknown = [a for a in self.archs if a not in ARCHS]
        if unknown:
            raise UserError(f"unknown architecture {unknown[0]!r}; choose among {', '.join(ARCHS)}")
        self.log = self.log or sys.stderr

    # -- paths ---------------------------------------------------------------------------------------------
    @property
    def spec(self) -> Scale:
        return SCALES[self.scale]

    @property
    def results(self) -> Path:
        return self.root / "results.jsonl"

    @property
    def lr_dir(self) -> Path:
        return self.root / "lr_sweep"

    def run_dir(self, arch: str) -> Path:
        return self.root / "runs" / arch

    def say(self, text: str):
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=self.log, flush=True)

    # -- steps ---------------------------------------------------------------------------------------------
    def _pool(self):
        return ProcessPoolExecutor(self.jobs, mp_context=get_context("spawn"), initializer=_worker_init)

    def _map(self, fn, tasks):
        """[fn(*task) for task in tasks], in worker processes (in this process when jobs is 1)."""
        if self.jobs == 1 or not tasks:
            return [fn(*task) for task in tasks]
        with self._pool() as pool:
            futures = [pool.submit(fn, *task) for task in tasks]
            return [f.result() for f in futures]

    def _train_settings(self, arch: str, **changes) -> dict:
        settings = {**self.spec.train, "arch": arch, "norm_backend": "torch", "device": "cpu"}
        if self.steps is not None:
            settings.update(steps=self.steps, save_every=max(1, self.steps // 3),
                            warmup=min(settings["warmup"], max(1, self.steps // 10)))
        return {**settings, **changes}

    def train_runs(self) -> dict:
        """Train (or reuse) the main run of every architecture; {arch: run dir}."""
        tasks = [(self._train_settings(a), str(self.run_dir(a))) for a in self.archs]
        todo = [t for t in tasks if not _finished(Path(t[1]))]
        if todo:
            steps = todo[0][0]["steps"]
            self.say(f"training {len(todo)} runs ({steps} steps each) in {self.jobs} processes")
        for run_dir, status, step, seconds in self._map(_train_task, todo):
            self.say(f"  {run_dir}: {status} after {step} steps ({seconds:.0f} s)")
        return {a: self.run_dir(a) for a in self.archs}

    def lr_sweep(self) -> dict:
        """Short runs over the scale's learning rates (reused when done); models.lr_sweep's record."""
        from models.lr_sweep import lr_sweep, run_dir_for
        from models.train import TrainConfig

        steps = self.spec.lr_steps
        base = self._train_settings(self.archs[0], steps=steps, save_every=0,
                                    warmup=max(1, steps // 10))
        tasks = [({**base, "arch": a, "lr": lr}, str(run_dir_for(self.lr_dir, a, lr)))
                 for a in self.archs for lr in self.spec.lrs]
        todo = [t for t in tasks if not _finished(Path(t[1]))]
        if todo:
            self.say(f"lr sweep: {len(todo)} runs of {steps} steps in {self.jobs} processes")
            self._map(_train_task, todo)
        return lr_sweep(self.archs, self.spec.lrs, self.lr_dir, TrainConfig(**base), progress=False)

    def sweep_settings(self, **changes):
        from hessian_tools.sweep import SweepSettings

        return SweepSettings(**{**self.spec.sweep, **changes})

    def measure(self, run_dirs: dict):
        """Sweep every checkpoint (params, activation, density) and the last one (bound, Adam sharpness)."""
        every = self.sweep_settings(what=("params", "activation"))
        last = self.sweep_settings(what=("density", "bound", "adam"), steps=(-1,))
        from hessian_tools.results_io import read_records
        from hessian_tools.sweep import pending_units, plan

        records = read_records(self.results)
        tasks = [(str(d), str(self.results), s) for s in (every, last) for d in run_dirs.values()
                 if pending_units(plan([d], s), records, s)]
        if not tasks:
            return
        self.say(f"sweeping {len(run_dirs)} runs into {self.results} in {self.jobs} processes")
        summaries = self._map(_sweep_task, tasks)
        measured = sum(s["measured"] for s in summaries)
        skipped = sum(s["skipped"] for s in summaries)
        errors = sum(s["errors"] for s in summaries)
        self.say(f"  {measured} measured, {skipped} reused, {errors} errors")

    def prepare(self, lr_sweep: bool = True) -> "Experiment":
        """Everything the figures need (the lr sweep only with `lr_sweep`), reusing what exists."""
        runs = self.train_runs()
        if lr_sweep:
            self.lr_sweep()
        self.measure(runs)
        return self

    # -- reading -----------------------------------------------------------------------------------------------
    def records(self) -> list[dict]:
        """The results of this experiment's runs measured with its current settings."""
        from hessian_tools.results_io import read_records
        from hessian_tools.sweep import MEASURE_FIELDS

        roots = {str(self.run_dir(a).resolve()) for a in self.archs}
        settings = self.sweep_settings()
        hashes = {settings.hash(m) for m in MEASURE_FIELDS}
        return [r for r in read_records(self.results)
                if r["provenance"].get("run_dir") in roots and r["provenance"].get("settings_hash") in hashes]

    def metrics(self) -> dict:
        """{arch: metrics lines of its main run}."""
        from models.train import METRICS_FILE, read_metrics

        return {a: read_metrics(self.run_dir(a) / METRICS_FILE) for a in self.archs}

    def lr_curves(self, record: dict) -> dict:
        """{(arch, lr): [(step, loss)]} of the lr sweep's runs."""
        from models.lr_sweep import run_dir_for
        from models.train import METRICS_FILE, read_metrics

        return {(a, r["lr"]): [(m["step"], m["loss"]) for m in read_metrics(run_dir_for(self.lr_dir, a, r["lr"])
                                                                             / METRICS_FILE)]
                for a, entry in record["archs"].items() for r in entry["runs"]}


def _finished(run_dir: Path) -> bool:
    status = run_dir / "status.json"
    return status.is_file() and json.loads(status.read_text()).get("status") in ("completed", "diverged")


# ---- summary -----------------------------------------------------------------------------------------------


def thresholds(records) -> dict:
    """{arch: {"gd": 2 / lambda_max, "adam": 38 / preconditioned sharpness}} at each run's last checkpoint
    (38 = (2 + 2 beta1) / (1 - beta1) for beta1 = 0.9; from theory.checks' record)."""
    out = {}
    for r in _final(records, "params.lambda_max"):
        out.setdefault(r["provenance"]["arch"], {})["gd"] = 2 / r["value"] if r["value"] > 0 else None
    for r in _final(records, "adam.sharpness"):
        p = r["payload"]
        factor = (2 + 2 * p["beta1"]) / (1 - p["beta1"])
        out.setdefault(r["provenance"]["arch"], {})["adam"] = factor / r["value"] if r["value"] > 0 else None
    return out


def _final(records, measure, arch=None):
    """The records of `measure` at each run's last checkpoint (of one architecture, or all)."""
    from hessian_tools.plotting import last_step, ok

    return [r for r in last_step(ok(records, measure)) if arch is None or r["provenance"]["arch"] == arch]


def summary_rows(exp: Experiment, records, lr_record) -> list[dict]:
    """One row per architecture: final loss, lambda_max +- error, ||H|| at the activation sites (max and
    median over sites), tightness range (bound / measured over layers), largest stable lr, 2 / lambda_max."""
    from hessian_tools.plotting import error_bar

    metrics, limits, rows = exp.metrics(), thresholds(records), []
    for arch in exp.archs:
        lam = _final(records, "params.lambda_max", arch)
        act = sorted(r["value"] for r in _final(records, "activation.spectral_norm", arch))
        ratios = [r["payload"]["ratio"] for r in _final(records, "bound.hxx", arch) if r["payload"].get("ratio")]
        losses = [m["loss"] for m in metrics.get(arch, [])][-10:]
        rows.append({
            "arch": arch,
            "final_loss": sum(losses) / len(losses) if losses else None,
            "lambda_max": lam[0]["value"] if lam else None,
            "lambda_error": error_bar(lam[0]) if lam else None,
            "act_norm_max": act[-1] if act else None,
            "act_norm_median": act[len(act) // 2] if act else None,
            "tightness": (min(ratios), max(ratios)) if ratios else None,
            "largest_stable_lr": lr_record["archs"].get(arch, {}).get("largest_stable_lr"),
            "at_edge": lr_record["archs"].get(arch, {}).get("at_edge"),
            "gd_threshold": limits.get(arch, {}).get("gd"),
            "adam_threshold": limits.get(arch, {}).get("adam"),
        })
    return rows


def format_rows(rows) -> str:
    def num(x, fmt=".3g"):
        return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)

    head = (f"{'arch':<15}{'loss':>7}{'lambda_max':>20}{'act ||H|| max':>15}{'median':>10}"
            f"{'bound/measured':>17}{'stable lr':>11}{'2/lam_max':>11}{'38/S_adam':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lam = "-" if r["lambda_max"] is None else f"{r['lambda_max']:.4g} +- {r['lambda_error']:.2g}"
        tight = "-" if r["tightness"] is None else f"{r['tightness'][0]:.3g}-{r['tightness'][1]:.3g}"
        lr = num(r["largest_stable_lr"]) + ("+" if r["at_edge"] else "")
        lines.append(f"{r['arch']:<15}{num(r['final_loss'], '.3f'):>7}{lam:>20}{num(r['act_norm_max']):>15}"
                     f"{num(r['act_norm_median']):>10}{tight:>17}{lr:>11}{num(r['gd_threshold']):>11}"
                     f"{num(r['adam_threshold']):>11}")
    lines.append("lambda_max: parameter-space Hessian of the mean held-out loss at the last checkpoint, +- "
                 "sqrt(residual bound^2 + data standard error^2); act ||H||: activation-space spectral norms at "
                 "the default sites; bound/measured: range over layers (SimpleNorm bound, or ||W||^2 ||H_yy|| for "
                 "a baseline's linear maps); stable lr: largest lr of the sweep that did not diverge ('+': the "
                 "largest tried).")
    return "\n".join(lines)


def write_figures(exp: Experiment, records, lr_record, out) -> list[Path]:
    """All six figures of the experiment into `out` (PNG and PDF each)."""
    from hessian_tools import plotting

    out = Path(out)
    paths = plotting.top_eigenvalue(records, out)
    paths += plotting.activation_norms(records, out)
    paths += plotting.bound_tightness(records, out)
    paths += plotting.lr_sweep(lr_record, exp.lr_curves(lr_record), thresholds(records), out)
    paths += plotting.densities(records, out)
    paths += plotting.activation_rms(exp.metrics(), out)
    return paths


def demo(exp: Experiment, figures_out=None, out=sys.stdout) -> dict:
    """Train, lr-sweep, measure and verify (reusing what is there), then print the table and the figures."""
    start = time.perf_counter()
    exp.prepare()
    records, lr_record = exp.records(), exp.lr_sweep()
    rows = summary_rows(exp, records, lr_record)
    paths = write_figures(exp, records, lr_record, figures_out or exp.root / "figures")
    print(format_rows(rows), file=out)
    print("\nfigures:", file=out)
    for p in paths:
        print(f"  {p}", file=out)
    print(f"\nresults: {exp.results}  (wall time {time.perf_counter() - start:.0f} s)", file=out)
    return {"rows": rows, "figures": [str(p) for p in paths], "wall_time_s": time.perf_counter() - start}

