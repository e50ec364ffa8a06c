"""The compact results an experiment's figures and numbers are made from (what figures/results/ commits).

DIR/records.jsonl    the sweep records, reduced to what the figures and findings read (`compact`): status,
                     value, error and its kind, convergence, HVPs, provenance (arch, run relative to the
                     experiment, train seed, step, measure, site, role, layer, settings hash, model SHA-256) and
                     per measure the payload fields they use (intervals, data error, curve points, bound rows,
                     densities); floats to 6 significant digits (densities 4)
DIR/lr_sweep.json    models.lr_sweep's record
DIR/training.json    per main run (arch, seed) its final loss (the mean of its last FINAL_STEPS losses), loss and
                     activation RMS every `stride` steps (and the last); per lr-sweep run (arch, lr, seed) its
                     loss curve
DIR/experiment.json  the experiment's settings and timing (demo.Experiment.describe)
DIR/eos.json         the edge-of-stability experiment's summary (hessian_tools.eos.EosExperiment.summary), floats
                     to 6 significant digits; {} when it was not run
Every reader (plotting, findings) works on full and compact records alike.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from hessian_tools.errors import UserError
from hessian_tools.results_io import RECORD, read_records, scan_bytes
from hessian_tools.schema import Obj, check

# a compact record: a sweep record without its wall time and settings (its provenance keeps the settings hash)
COMPACT_RECORD = Obj(RECORD.fields, optional=("wall_time_s", "settings"))

FILES = ("records.jsonl", "lr_sweep.json", "training.json", "experiment.json", "eos.json")
STRIDE = 5  # training metrics kept every STRIDE steps
FINAL_STEPS = 10  # the final loss of a run: the mean training loss of its last FINAL_STEPS steps
_PROVENANCE = ("arch", "run_dir", "train_seed", "step", "measure", "site", "site_role", "layer", "settings_hash",
               "model_sha256")
_PAYLOAD = {  # measure prefix -> payload keys kept
    "lanczos": ("interval", "certified_side", "failure_probability", "data_error", "adam"),
    "params.sample_size_curve": ("points",),
    "activation.": ("interval", "certified_side", "failure_probability", "data_error", "block_diagonal_norm",
                    "per_batch_factors"),
    "bound.hxx": ("layer", "kind", "measured", "measured_error", "bound", "ratio", "c_over_gn", "violated",
                  "prenorm_bound", "prenorm_measured", "prenorm_violated", "certified_side", "failure_probability"),
    "params.density": ("grid", "density", "width"),
    "params.trace": (),
}
_DATA_ERROR = ("method", "status", "value", "standard_error", "interval", "level", "bias", "union_value", "warning",
               "n_groups", "n_batches", "values")
_POINT = ("n_batches", "value", "solver_error", "status")


def _round(x, digits: int = 6):
    if isinstance(x, float):
        return float(f"{x:.{digits}g}") if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _round(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [_round(v, digits) for v in x]
    return x


def _payload_keys(measure: str) -> tuple:
    for prefix, keys in _PAYLOAD.items():
        if measure.startswith(prefix):
            return keys
    return _PAYLOAD["lanczos"]


def compact(record: dict, root: Path | None = None) -> dict:
    """The fields of a sweep record the figures use (module docstring); run_dir relative to `root`."""
    p = record.get("provenance", {})
    measure = p.get("measure", "")
    provenance = {k: p.get(k) for k in _PROVENANCE}
    if root is not None and provenance["run_dir"]:
        try:
            provenance["run_dir"] = str(Path(provenance["run_dir"]).relative_to(Path(root).resolve()))
        except ValueError:
            pass
    payload = {k: record.get("payload", {}).get(k) for k in _payload_keys(measure)}
    if payload.get("data_error"):
        payload["data_error"] = {k: v for k, v in payload["data_error"].items() if k in _DATA_ERROR}
    if payload.get("points"):
        payload["points"] = [{k: pt.get(k) for k in _POINT} for pt in payload["points"]]
    if measure == "params.density" and payload.get("grid"):
        grid = payload["grid"]
        payload["grid"] = [grid[0], grid[-1], len(grid)]
        payload["density"] = _round(payload["density"], 4)
    out = {k: record.get(k) for k in ("quantity", "value", "error", "error_kind", "converged", "hvp_count", "status")}
    return _round({**out, "provenance": provenance, "payload": payload})


def density_grid(payload: dict) -> list[float]:
    """The grid of a density payload: the full list, or [lo, hi, n] of a compact record expanded."""
    grid = payload["grid"]
    if len(grid) == 3 and len(payload["density"]) == int(grid[2]) != 3:
        lo, hi, n = grid[0], grid[1], int(grid[2])
        return [lo + (hi - lo) * i / (n - 1) for i in range(n)]
    return grid


def final_loss(lines: list[dict]) -> float | None:
    """The mean training loss of the last FINAL_STEPS metrics lines (None without any)."""
    losses = [m["loss"] for m in lines[-FINAL_STEPS:]]
    return sum(losses) / len(losses) if losses else None


@dataclass
class Results:
    """What the figures and findings read: sweep records, the lr sweep's record, its loss curves {(arch, lr,
    seed): [(step, loss)]}, the main runs' metrics {(arch, seed): [metrics lines]} and final losses {(arch, seed):
    loss}, the experiment's settings, and the edge-of-stability summary (hessian_tools.eos; {} when not run)."""

    records: list
    lr_sweep: dict
    curves: dict
    metrics: dict
    final_losses: dict
    experiment: dict = field(default_factory=dict)
    root: Path | None = None
    eos: dict = field(default_factory=dict)

    @classmethod
    def of(cls, records, lr_sweep, curves, metrics, experiment, root=None, eos=None) -> "Results":
        """From full metrics lines (final losses computed from them)."""
        return cls(records, lr_sweep, curves, metrics, {k: final_loss(v) for k, v in metrics.items()}, experiment,
                   root, eos or {})

    def write(self, directory) -> list[Path]:
        """The compact bundle into `directory` (module docstring); returns the files."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        lines = sorted(json.dumps(compact(r, self.root), sort_keys=True) for r in self.records)
        training = {"stride": STRIDE, "runs": [
            {"arch": a, "seed": s, "final_loss": _round(self.final_losses.get((a, s))), "lines": [_round({k: m.get(k) for k in ("step", "loss", "act_rms")})
                                             for i, m in enumerate(lines_) if i % STRIDE == STRIDE - 1
                                             or i == len(lines_) - 1]}
            for (a, s), lines_ in sorted(self.metrics.items())],
            "lr_sweep": [{"arch": a, "lr": lr, "seed": s, "curve": _round([list(p) for p in points])}
                         for (a, lr, s), points in sorted(self.curves.items())]}
        files = dict(zip(FILES, ("".join(line + "\n" for line in lines), json.dumps(_round(self.lr_sweep), indent=1),
                                 json.dumps(training, separators=(",", ":")),
                                 json.dumps(self.experiment, indent=1, sort_keys=True),
                                 json.dumps(_round(self.eos), separators=(",", ":"), allow_nan=False))))
        for name, text in files.items():
            (directory / name).write_text(text if text.endswith("\n") else text + "\n")
        return [directory / name for name in FILES]

    @classmethod
    def load(cls, directory) -> "Results":
        directory = Path(directory)
        training = json.loads((directory / "training.json").read_text())
        metrics = {(r["arch"], r["seed"]): r["lines"] for r in training["runs"]}
        losses = {(r["arch"], r["seed"]): r["final_loss"] for r in training["runs"]}
        curves = {(r["arch"], r["lr"], r["seed"]): [tuple(p) for p in r["curve"]] for r in training["lr_sweep"]}
        eos = directory / "eos.json"
        return cls(read_compact(directory / "records.jsonl"), json.loads((directory / "lr_sweep.json").read_text()),
                   curves, metrics, losses, json.loads((directory / "experiment.json").read_text()), root=directory,
                   eos=json.loads(eos.read_text()) if eos.is_file() else {})


def read_compact(path) -> list[dict]:
    """The compact records of a bundle's records.jsonl, each checked against COMPACT_RECORD; a bundle is read,
    never repaired: a line that is not one is a one-line UserError naming it."""
    path = Path(path)
    scan = scan_bytes(path, path.read_bytes(), checker=lambda r: check(r, COMPACT_RECORD, prefix="record"),
                      noun="compact record")
    bad = scan.invalid()
    if bad:
        raise UserError(f"{path}: line {bad[0].number} is not a compact record ({bad[0].reason})")
    return scan.records


def read_results(path) -> Results:
    """A results bundle directory, or a sweep results file (records only: no lr sweep, curves or metrics)."""
    path = Path(path)
    if path.is_dir():
        return Results.load(path)
    return Results(read_records(path), {"archs": {}}, {}, {}, {})
