"""Checkpoint sweeps: every checkpoint of every run measured on the run's fixed batches, one JSON line per result.

A unit of work is (run, checkpoint step, measure, site). Measures (grouped by `what`):
  params      params.lambda_max (Lanczos, largest) and params.spectral_norm (Lanczos, largest |lambda|) of the
              parameter-space Hessian; with n_groups >= 2 each also carries the data error bar: the same
              estimate on n_groups disjoint groups of the batches (payload "data_spread": group values, their
              std and std / sqrt(n_groups), the standard error of the estimate on the union).
  activation  activation.spectral_norm at each site (default sites: see `default_sites`).
  bound       bound.hxx: theory.verify's row (measured ||H_xx||, the bound, tightness, ||C||/||GN||) per layer.
  adam        adam.sharpness: Adam's preconditioned sharpness lambda_max(P^-1 H) beside 38 / lr (theory.checks).
  density     params.density: SLQ density on the fixed grid and width of the settings.
  trace       params.trace: Hutch++ trace with its standard error.
Every checkpoint of a run is measured on the same batches (Checkpoint.measurement_batches with the settings'
n_batches, batch_size, seq_len and seed) and the same seeded probes. Lanczos is warm-started from the previous
checkpoint's top Ritz vector of the same run and measure (lanczos mixes in its own seeded noise, on which its
upper bound rests); warm starts live in memory, so a restarted sweep starts cold.

A record is an Estimate dict plus provenance (run dir, arch, step, checkpoint, version, seed, batches, tokens, dtype,
measure, site, settings hash). Restart: units whose key (run, step, measure, site, settings hash) already has
a record with a status other than "error" are skipped; an error is retried, and written again only when its
message changed. Records are appended with hessian_tools.results_io (one locked write per line).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hessian_tools import __version__
from hessian_tools.errors import UserError
from hessian_tools.records import Estimate
from hessian_tools.results_io import append_record, read_records

WHAT = ("params", "activation", "bound", "adam", "density", "trace")
MEASURES = {
    "params": ("params.lambda_max", "params.spectral_norm"),
    "activation": ("activation.spectral_norm",),
    "bound": ("bound.hxx",),
    "adam": ("adam.sharpness",),
    "density": ("params.density",),
    "trace": ("params.trace",),
}
_LANCZOS = ["tol", "max_iter", "dtype"]
MEASURE_FIELDS = {
    "params.lambda_max": _LANCZOS + ["n_groups"],
    "params.spectral_norm": _LANCZOS + ["n_groups"],
    "activation.spectral_norm": _LANCZOS,
    "bound.hxx": ["tol"],  # theory.verify works in float64
    "adam.sharpness": ["tol"],
    "params.density": ["dtype", "density_probes", "density_iter", "density_grid", "density_width"],
    "params.trace": ["dtype", "trace_matvecs"],
    "checkpoint.load": [],  # the error record of a checkpoint that cannot be loaded
}
ATTENTION_NAMES, FFN_NAMES = ("attention", "attn"), ("feed_forward", "mlp")


@dataclass(frozen=True)
class SweepSettings:
    """What to measure and how. The fields after `steps` fix the numbers (MEASURE_FIELDS: which enter the
    settings hash of each measure).

    what: groups of measures (WHAT); sites: regex over site names replacing the default activation sites;
    steps: only checkpoints at these steps (None = all; -1 = each run's last). Batches: n_batches fixed
    held-out batches of batch_size sequences of seq_len tokens (None = the model's context), chosen by seed.
    tol: relative Lanczos tolerance; dtype: evaluation dtype; n_groups: disjoint batch groups of the data
    error bar (< 2 = none). density_*: SLQ probes, Lanczos steps, fixed grid (lo, hi, points) and Gaussian
    width; trace_matvecs: Hutch++ budget. tokens / tokenizer / data: the measurement tokens (models.tokens;
    None = each run's own text); when set, their paths enter the settings hash.
    """

    what: tuple = ("params",)
    sites: str | None = None
    steps: tuple | None = None
    n_batches: int = 4
    batch_size: int = 8
    seq_len: int | None = None
    seed: int = 0
    tol: float = 1e-3
    max_iter: int | None = None
    dtype: str = "float32"
    n_groups: int = 2
    density_probes: int = 4
    density_iter: int = 40
    density_grid: tuple = (-50.0, 450.0, 1001)
    density_width: float = 2.5
    trace_matvecs: int = 30
    tokens: str | None = None
    tokenizer: str | None = None
    data: str | None = None

    def __post_init__(self):
        what = tuple(self.what)
        unknown = [w for w in what if w not in WHAT]
        if not what or unknown:
            raise UserError(f"unknown --what {','.join(unknown) or '(empty)'}; choose from {','.join(WHAT)}")
        object.__setattr__(self, "what", what)
        if self.sites is not None:
            try:
                re.compile(self.sites)
            except re.error as exc:
                raise UserError(f"--sites {self.sites!r} is not a valid regular expression ({exc})") from None
        for name in ("n_batches", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dtype not in ("float32", "float64"):
            raise UserError(f"--dtype {self.dtype} is not supported; use float32 or float64")
        if not self.tol > 0:
            raise UserError(f"--tol must be positive, got {self.tol}")
        if self.n_groups >= 2 and self.n_batches % self.n_groups:
            raise UserError(f"{self.n_batches} batches cannot form {self.n_groups} equal groups for the data "
                            f"error bar: pass --batches as a multiple of --groups (or --groups 0)")
        object.__setattr__(self, "density_grid", tuple(float(x) for x in self.density_grid))
        for name, value in self.token_sources().items():  # absolute, so the settings hash is the same from any cwd
            object.__setattr__(self, name, str(Path(value).resolve()))
        if self.steps is not None:
            object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))

    def numbers(self, measure: str) -> dict:
        """The settings that determine the numbers of `measure` (its settings hash is made of these)."""
        fields = ["n_batches", "batch_size", "seq_len", "seed"] + MEASURE_FIELDS[measure]
        return {**{k: getattr(self, k) for k in fields}, **self.token_sources()}

    def token_sources(self) -> dict:
        """The token options that are set, for models.checkpoint.load_checkpoint."""
        return {k: getattr(self, k) for k in ("tokens", "tokenizer", "data") if getattr(self, k) is not None}

    def hash(self, measure: str) -> str:
        text = json.dumps({"measure": measure, **self.numbers(measure)}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Unit:
    run_dir: Path
    checkpoint: Path
    step: int
    measure: str
    site: str | None = None
    role: str | None = None
    layer: int | None = None


def record_key(record: dict) -> tuple:
    """(run dir, step, measure, site, settings hash) of a sweep record."""
    p = record.get("provenance", {})
    return p.get("run_dir"), p.get("step"), p.get("measure"), p.get("site"), p.get("settings_hash")


def unit_key(unit: Unit, settings: "SweepSettings") -> tuple:
    return str(unit.run_dir), unit.step, unit.measure, unit.site, settings.hash(unit.measure)


# ---- sites and layers ---------------------------------------------------------------------------------------


def _first_map(block: nn.Module, prefix: str, branch_names) -> str | None:
    """Name of the first linear map (nn.Linear or SimpleNorm) inside the block's branch, or None."""
    from models.norms import SimpleNorm

    for branch in branch_names:
        if hasattr(block, branch):
            for name, module in getattr(block, branch).named_modules():
                if isinstance(module, (nn.Linear, SimpleNorm)):
                    return f"{prefix}.{branch}.{name}"
    return None


def default_sites(model: nn.Module) -> list[tuple[str, str, int]]:
    """[(site, role, layer)]: per block i, three sites comparable across the five architectures:
    attn_in = the input of the attention branch's first map (q of a split attention: wq, snq, c_q; gpt2's
    fused c_attn), ffn_in = the input of the FFN's first map (the gate w1 / sn1, or c_fc), block_out = the
    residual stream after the block. (A branch's output site would repeat a residual-stream Hessian: the loss
    sees a branch output only through the residual sum, so their Hessians are equal.)"""
    from models.train import blocks

    sites = []
    for i, (prefix, block) in enumerate(blocks(model).items()):
        for role, names in (("attn_in", ATTENTION_NAMES), ("ffn_in", FFN_NAMES)):
            name = _first_map(block, prefix, names)
            if name is not None:
                sites.append((f"{name}:in", role, i))
        sites.append((f"{prefix}:out", "block_out", i))
    return sites


def _layer_of(name: str) -> int | None:
    m = re.search(r"(?:^|\.)(?:layers|h)\.(\d+)(?:\.|:|$)", name)
    return int(m.group(1)) if m else None


def select_sites(model: nn.Module, pattern: str | None) -> list[tuple[str, str | None, int | None]]:
    """The default sites, or every site of models.sites.list_sites whose name matches `pattern`."""
    if pattern is None:
        return default_sites(model)
    from models.sites import list_sites

    roles = {site: role for site, role, _ in default_sites(model)}
    chosen = [(s, roles.get(s), _layer_of(s)) for s in list_sites(model) if re.search(pattern, s)]
    if not chosen:
        raise UserError(f"--sites {pattern!r} matches no site of {model.config.arch}; "
                        "`hessian-tools inspect CKPT` lists them")
    return chosen


# ---- planning ------------------------------------------------------------------------------------------------


def _skeleton(checkpoint: Path) -> nn.Module:
    """The run's model built on the meta device from its meta.json (names and module types only)."""
    from models.config import GPTConfig
    from models.gpt import build_model

    try:
        config = GPTConfig.from_dict(json.loads((checkpoint / "meta.json").read_text())["model_config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{checkpoint}/meta.json: not a valid checkpoint record ({exc})") from None
    with torch.device("meta"):
        return build_model(config)


def plan(run_dirs, settings: SweepSettings) -> list[Unit]:
    """Every unit of the sweep in order (run, step, measure, site); UserError for a run dir without checkpoints."""
    from models.checkpoint import CKPT_RE, list_checkpoints

    units = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir).resolve()
        found = list_checkpoints(run_dir)
        if not found:
            raise UserError(f"{run_dir}: holds no checkpoint (ckpt_NNNNNNN/ with a meta.json); is it a run directory?")
        if settings.steps is not None:
            last = int(CKPT_RE.match(found[-1].name).group(1))
            wanted = {last if s == -1 else s for s in settings.steps}
            found = [c for c in found if int(CKPT_RE.match(c.name).group(1)) in wanted]
        from theory.verify import bound_layers

        skeleton = None
        for ckpt in found:
            step = int(CKPT_RE.match(ckpt.name).group(1))
            for what in settings.what:
                if what == "activation":
                    skeleton = skeleton or _skeleton_or_none(ckpt)
                    sites = select_sites(skeleton, settings.sites) if skeleton is not None else []
                    units += [Unit(run_dir, ckpt, step, MEASURES[what][0], s, r, i) for s, r, i in sites]
                elif what == "bound":
                    skeleton = skeleton or _skeleton_or_none(ckpt)
                    layers = bound_layers(skeleton) if skeleton is not None else []
                    units += [Unit(run_dir, ckpt, step, "bound.hxx", name, kind, _layer_of(name))
                              for name, kind in layers]
                else:
                    units += [Unit(run_dir, ckpt, step, m) for m in MEASURES[what]]
    return units


def _skeleton_or_none(ckpt: Path):
    try:
        return _skeleton(ckpt)
    except UserError:
        return None  # reported when the checkpoint itself is loaded


# ---- measuring -----------------------------------------------------------------------------------------------


def _dtype(settings: SweepSettings) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[settings.dtype]


def _as_spectral_norm(est: Estimate) -> Estimate:
    """A which="magnitude" Lanczos estimate as ||H||_2 (value |theta|, the signed eigenvalue in the payload)."""
    if est.value is None:
        return dataclasses.replace(est, quantity="spectral_norm")
    payload = {**est.payload, "signed_eigenvalue": est.value}
    return dataclasses.replace(est, quantity="spectral_norm", value=abs(est.value), payload=payload)


class Measurer:
    """Measures units of one loaded checkpoint; keeps warm-start vectors across checkpoints of a run."""

    def __init__(self, settings: SweepSettings):
        self.s = settings
        self.warm: dict = {}
        self.checked: dict = {}

    def lanczos_estimate(self, make_op, batches, which: str, warm_key, groups: bool) -> Estimate:
        """Lanczos (k=1) on make_op(batches), warm-started; with `groups`, the data spread over n_groups."""
        from hessian_tools.estimators import data_spread, lanczos

        s = self.s
        solve = functools.partial(lanczos, k=1, which=which, tol=s.tol, max_iter=s.max_iter, seed=s.seed)
        est = solve(make_op(batches), v0=self.warm.get(warm_key), return_vectors=True)
        if est.vectors is None:
            return _as_spectral_norm(est) if which == "magnitude" else est
        top = est.vectors[:, 0]
        self.warm[warm_key] = top
        est = _as_spectral_norm(est) if which == "magnitude" else est
        if groups and s.n_groups >= 2 and est.status == "ok":
            spread = data_spread(make_op, batches, functools.partial(solve, v0=top), s.n_groups)
            data = {"n_groups": s.n_groups, "status": spread.status, "group_values": None, "std": None,
                    "std_error": None}
            if spread.status == "ok":
                values = [abs(v) if which == "magnitude" else v for v in spread.payload["group_values"]]
                std = statistics.stdev(values)
                data.update(group_values=values, std=std, std_error=std / math.sqrt(len(values)))
            est = dataclasses.replace(est, hvp_count=est.hvp_count + spread.hvp_count,
                                      payload={**est.payload, "data_spread": data})
        return dataclasses.replace(est, vectors=None)

    def guard(self, model, batches, run_key) -> dict | None:
        """The engine's self-check (finite, symmetric, equal to gradient differences), once per run."""
        from hessian_tools.operators import ParamHessian, self_check

        if run_key not in self.checked:
            self.checked[run_key] = self_check(ParamHessian(model, batches[:1], dtype=_dtype(self.s)), seed=self.s.seed)
        return self.checked[run_key]

    def measure(self, unit: Unit, ckpt, batches) -> Estimate:
        from hessian_tools.operators import ActivationHessian, ParamHessian

        s, dtype, model = self.s, _dtype(self.s), ckpt.model
        key = (str(unit.run_dir), unit.measure, unit.site)
        params = lambda b: ParamHessian(model, b, dtype=dtype)  # noqa: E731
        if unit.measure.startswith("params."):
            check = self.guard(model, batches, str(unit.run_dir))
        if unit.measure == "params.lambda_max":
            est = self.lanczos_estimate(params, batches, "largest", key, groups=True)
        elif unit.measure == "params.spectral_norm":
            est = self.lanczos_estimate(params, batches, "magnitude", key, groups=True)
        elif unit.measure == "activation.spectral_norm":
            site = lambda b: ActivationHessian(model, b, unit.site, dtype=dtype)  # noqa: E731
            return self.lanczos_estimate(site, batches, "magnitude", key, groups=False)
        elif unit.measure == "params.density":
            from hessian_tools.estimators import slq_density

            est = slq_density(params(batches), s.density_probes, s.density_iter, grid=s.density_grid,
                              width=s.density_width, seed=s.seed)
        elif unit.measure == "params.trace":
            from hessian_tools.estimators import hutchpp_trace

            est = hutchpp_trace(params(batches), s.trace_matvecs, seed=s.seed)
        elif unit.measure == "bound.hxx":
            return self._bound(unit, model, batches)
        elif unit.measure == "adam.sharpness":
            return self._adam(ckpt, batches)
        else:
            raise AssertionError(unit.measure)
        return dataclasses.replace(est, settings={**est.settings, "self_check": check})

    def _bound(self, unit: Unit, model, batches) -> Estimate:
        from theory.verify import Settings, verify_bound

        start = time.perf_counter()
        (row,) = verify_bound(model, batches, f"^{re.escape(unit.site)}$", Settings(tol=self.s.tol, seed=self.s.seed))
        return Estimate("hxx_norm", row["measured"], row["measured_error"], "residual-bound", bool(row["converged"]),
                        int(row.get("hvp_count") or 0), time.perf_counter() - start,
                        {"method": "theory.verify", "tol": self.s.tol, "seed": self.s.seed, "dtype": "float64"},
                        payload=row)

    def _adam(self, ckpt, batches) -> Estimate:
        from theory.checks import check_adam_sharpness

        start = time.perf_counter()
        row = check_adam_sharpness(ckpt, batches, tol=self.s.tol, seed=self.s.seed)
        return Estimate("adam_preconditioned_sharpness", row["preconditioned_sharpness"], row["error"],
                        "residual-bound", bool(row["pass"]), 0, time.perf_counter() - start,
                        {"method": "theory.checks.check_adam_sharpness", "tol": self.s.tol, "seed": self.s.seed,
                         "dtype": "float64"}, payload=row)


# ---- the sweep -----------------------------------------------------------------------------------------------


def _provenance(unit: Unit, settings: SweepSettings, config: dict | None, batches_spec: dict) -> dict:
    return {"run_dir": str(unit.run_dir), "run": unit.run_dir.name, "arch": (config or {}).get("arch"),
            "model": config, "step": unit.step, "checkpoint": str(unit.checkpoint), "version": __version__,
            "seed": settings.seed, "batches": batches_spec, "dtype": settings.dtype, "measure": unit.measure,
            "site": unit.site, "site_role": unit.role, "layer": unit.layer,
            "settings_hash": settings.hash(unit.measure)}


def _recorded_config(checkpoint: Path) -> dict | None:
    try:
        return json.loads((checkpoint / "meta.json").read_text())["model_config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def error_record(unit: Unit, settings: SweepSettings, message: str, config=None, batches_spec=None) -> dict:
    """A failed unit: status "error", value null, the one-line message in payload["message"]."""
    est = Estimate(unit.measure.split(".")[-1], None, None, "none", False, 0, 0.0, {}, payload={"message": message},
                   status="error")
    return est.with_provenance(**_provenance(unit, settings, config, batches_spec or {})).to_dict()


def pending_units(units, records, settings: SweepSettings) -> list[Unit]:
    """The units without a record (other than an error) among `records`."""
    done = {record_key(r) for r in records if r.get("status") != "error"}
    return [u for u in units if unit_key(u, settings) not in done]


def sweep(run_dirs, out, settings: SweepSettings = SweepSettings(), progress: bool = True, log=None) -> dict:
    """Measure every pending unit of `plan(run_dirs, settings)`, appending one record per unit to `out`.

    Returns {"total", "skipped", "measured", "errors", "out", "wall_time_s"}. Problems with one checkpoint
    (unreadable, NaN loss, failed self-check) are written as error records and reported on `log` (stderr) in
    one line each; the sweep goes on.
    """
    from tqdm import tqdm

    from models.checkpoint import load_checkpoint

    log = log or sys.stderr
    out = Path(out)
    start = time.perf_counter()
    units = plan(run_dirs, settings)
    existing = read_records(out)
    pending = pending_units(units, existing, settings)
    seen_errors = {(record_key(r), r.get("payload", {}).get("message")) for r in existing if r.get("status") == "error"}
    counts = {"total": len(units), "skipped": len(units) - len(pending), "measured": 0, "errors": 0}
    measurer, batch_cache = Measurer(settings), {}

    def write_error(unit, message, config=None, spec=None):
        counts["errors"] += 1
        record = error_record(unit, settings, message, config, spec)
        if (record_key(record), message) not in seen_errors:
            seen_errors.add((record_key(record), message))
            append_record(out, record)

    by_checkpoint: dict = {}
    for unit in pending:
        by_checkpoint.setdefault(unit.checkpoint, []).append(unit)
    bar = tqdm(total=len(units), initial=counts["skipped"], file=log, disable=not progress, unit="unit",
               desc="sweep", dynamic_ncols=True)
    try:
        for checkpoint, todo in by_checkpoint.items():
            config = _recorded_config(checkpoint)
            try:
                ckpt = load_checkpoint(checkpoint, settings.token_sources())
            except (UserError, OSError) as exc:
                message = f"cannot load checkpoint: {exc}"
                print(f"hessian-tools sweep: skipping {checkpoint}: {exc}", file=log)
                load_unit = dataclasses.replace(todo[0], measure="checkpoint.load", site=None, role=None, layer=None)
                write_error(load_unit, message, config)
                counts["errors"] += len(todo) - 1
                bar.update(len(todo))
                continue
            spec = {"n_batches": settings.n_batches, "batch_size": settings.batch_size,
                    "seq_len": settings.seq_len or ckpt.config.seq_len, "seed": settings.seed, "split": "held-out"}
            run_key = str(todo[0].run_dir)
            if run_key not in batch_cache:
                batch_cache[run_key] = ckpt.measurement_batches(settings.n_batches, settings.batch_size,
                                                                settings.seq_len, seed=settings.seed)
            batches = batch_cache[run_key]
            for unit in todo:
                bar.set_postfix_str(f"{unit.run_dir.name} step {unit.step} {unit.measure} {unit.site or ''}".strip())
                try:
                    est = measurer.measure(unit, ckpt, batches)
                except UserError as exc:
                    print(f"hessian-tools sweep: {checkpoint} {unit.measure} {unit.site or ''}: {exc}", file=log)
                    write_error(unit, str(exc), ckpt.config.to_dict(), spec)
                else:
                    record = est.with_provenance(**_provenance(unit, settings, ckpt.config.to_dict(), spec),
                                                 tokens=ckpt.token_provenance())
                    if append_record(out, record.to_dict(), key=record_key):
                        counts["measured"] += 1
                    else:
                        counts["skipped"] += 1  # another sweep wrote it meanwhile
                bar.update(1)
    finally:
        bar.close()
    return {**counts, "out": str(out), "wall_time_s": time.perf_counter() - start}
