"""Checkpoint sweeps: every checkpoint of every run measured on the run's fixed batches, one JSON line per result.

A unit of work is (run, checkpoint, measure, site). Measures, grouped by `what` (hessian_tools.sweep_measures
says what each computes, its solver interval and its data error bar):
  params       params.lambda_max, params.spectral_norm: the raw parameter-space Hessian
  scaled       layer.lambda_max, elementwise.lambda_max: in coordinates that function-preserving rescalings of
               the weights cannot change, comparable across architectures
  adam         adam.sharpness: lambda_max(P^-1 H) with Adam's preconditioner, beside 38 / lr
  activation   activation.spectral_norm and activation.scale_free at each site: by default the sites by role,
               the same in every architecture (`default_sites`); `sites` (a regex) picks per-module sites instead
  sample_size  params.sample_size_curve: lambda_max on 1, 2, 4, ..., N batches (its drift is the bias)
  bound        bound.hxx: theory.verify's row per layer (measured ||H_xx||, the bound, tightness, ||C|| / ||GN||)
  density      params.density: SLQ density on the fixed grid and width of the settings
  trace        params.trace: Hutch++ trace with its standard error
Every checkpoint of a run is measured on the same batches (Checkpoint.measurement_batches with the settings'
n_batches, batch_size, seq_len and seed) and the same seeded probes.

A record is an Estimate dict plus provenance (run dir, arch, step, checkpoint, the SHA-256 of its model file,
training seed, version, batches, tokens, dtype, measure, site, settings hash). Its key (`record_key`) is (run
dir, step, measure, site, settings hash, model SHA-256): a run directory re-created with another model gets
new records. Restart: units with a record of status "ok" under their key are skipped. A unit that cannot be
measured (its checkpoint does not load, its metadata is corrupt, its optimizer state is missing, its solve
fails) gets a failure record: status "failed: REASON" (one line), value null; failures are retried on the
next sweep and written again only when the reason changed. Records are appended with hessian_tools.results_io
(one locked write per line; the key check under the lock covers failure records too, so concurrent sweeps
write each once). A sweep that recorded a failure says so in its summary (the CLI then exits 1).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hessian_tools import __version__
from hessian_tools.errors import UserError
from hessian_tools.estimators.data_error import MIN_GROUPS
from hessian_tools.records import Estimate
from hessian_tools.results_io import append_record, read_records
from hessian_tools.sweep_measures import QUANTITY, Measurer

WHAT = ("params", "scaled", "adam", "activation", "sample_size", "bound", "density", "trace")
MEASURES = {
    "params": ("params.lambda_max", "params.spectral_norm"),
    "scaled": ("layer.lambda_max", "elementwise.lambda_max"),
    "adam": ("adam.sharpness",),
    "activation": ("activation.spectral_norm", "activation.scale_free"),
    "sample_size": ("params.sample_size_curve",),
    "bound": ("bound.hxx",),
    "density": ("params.density",),
    "trace": ("params.trace",),
}
MEASURE_NAMES = tuple(m for group in MEASURES.values() for m in group)
_LANCZOS = ["tol", "max_iter", "dtype"]
_JACKKNIFED = _LANCZOS + ["n_groups"]
MEASURE_FIELDS = {
    "params.lambda_max": _JACKKNIFED,
    "params.spectral_norm": _JACKKNIFED,
    "layer.lambda_max": _JACKKNIFED,
    "elementwise.lambda_max": _JACKKNIFED,
    "adam.sharpness": _JACKKNIFED,
    "params.sample_size_curve": _LANCZOS,
    "activation.spectral_norm": _LANCZOS,
    "activation.scale_free": _LANCZOS,
    "bound.hxx": ["tol"],  # theory.verify works in float64
    "params.density": ["dtype", "density_probes", "density_iter", "density_grid", "density_width"],
    "params.trace": ["dtype", "trace_matvecs"],
}


@dataclass(frozen=True)
class SweepSettings:
    """What to measure and how. The fields after `steps` fix the numbers (MEASURE_FIELDS: which enter the
    settings hash of each measure).

    what: groups of measures (WHAT) or measure names (MEASURE_NAMES); sites: regex over per-module site names (models.sites.list_sites) replacing
    the role sites; layers: regex over the layers of the bound (theory.verify.bound_layers; None = all); steps: only checkpoints at these steps (None = all; -1 = each run's last). Batches: n_batches
    fixed held-out batches of batch_size sequences of seq_len tokens (None = the model's context), chosen by seed.
    tol: relative Lanczos tolerance; dtype: evaluation dtype; n_groups: disjoint batch groups of the jackknife
    (0 = no data error bar for the parameter-space measures, else >= 8 dividing n_batches); fuse_batches: evaluate
    each parameter-space operator's batches as one batch (the same numbers to rounding, so not in the hash;
    sweep_measures). density_*: SLQ probes, Lanczos steps, fixed grid (lo, hi, points) and Gaussian width;
    trace_matvecs: Hutch++ budget. tokens / tokenizer / data: the measurement tokens (models.tokens; None = each
    run's own text); when set, their paths enter the settings hash.
    """

    what: tuple = ("params",)
    sites: str | None = None
    layers: str | None = None
    steps: tuple | None = None
    n_batches: int = 8
    batch_size: int = 4
    seq_len: int | None = None
    seed: int = 0
    tol: float = 1e-3
    max_iter: int | None = None
    dtype: str = "float32"
    n_groups: int = 8
    fuse_batches: bool = False
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
        unknown = [w for w in what if w not in WHAT and w not in MEASURE_NAMES]
        if not what or unknown:
            raise UserError(f"unknown --what {','.join(unknown) or '(empty)'}; choose from {','.join(WHAT)} "
                            "or measure names such as params.lambda_max")
        object.__setattr__(self, "what", what)
        for flag, pattern in (("--sites", self.sites), ("--layers", self.layers)):
            try:
                re.compile(pattern or "")
            except re.error as exc:
                raise UserError(f"{flag} {pattern!r} is not a valid regular expression ({exc})") from None
        for name in ("n_batches", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dtype not in ("float32", "float64"):
            raise UserError(f"--dtype {self.dtype} is not supported; use float32 or float64")
        if not self.tol > 0:
            raise UserError(f"--tol must be positive, got {self.tol}")
        if self.n_groups and self.n_groups < MIN_GROUPS:
            raise UserError(f"--groups {self.n_groups}: the jackknife needs at least {MIN_GROUPS} groups "
                            "(or --groups 0 for no data error bar)")
        if self.n_groups and self.n_batches % self.n_groups:
            raise UserError(f"{self.n_batches} batches cannot form {self.n_groups} equal groups for the data "
                            f"error bar: pass --batches as a multiple of --groups (or --groups 0)")
        object.__setattr__(self, "density_grid", tuple(float(x) for x in self.density_grid))
        if "params.density" in self.measures():
            from hessian_tools.footprint import density_bytes, require_memory

            require_memory({"density grid": density_bytes(int(self.density_grid[2]), self.density_iter)},
                           "--density-grid")
        for name, value in self.token_sources().items():  # absolute, so the settings hash is the same from any cwd
            object.__setattr__(self, name, str(Path(value).resolve()))
        if self.steps is not None:
            object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))

    def measures(self) -> list[str]:
        """The measure names `what` asks for, in order."""
        names = [m for w in self.what for m in MEASURES.get(w, (w,))]
        return list(dict.fromkeys(names))

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
    model_sha256: str | None = None


def record_key(record: dict) -> tuple:
    """(run dir, step, measure, site, settings hash, model SHA-256) of a sweep record."""
    p = record.get("provenance") or {}
    return (p.get("run_dir"), p.get("step"), p.get("measure"), p.get("site"), p.get("settings_hash"),
            p.get("model_sha256"))


def write_key(record: dict) -> tuple:
    """What results_io.append_record compares under its lock: the record key, plus for a failure its status (a
    success and a failure of the same unit differ; two equal failures do not)."""
    return record_key(record) + (("ok",) if record.get("status") == "ok" else ("failed", record.get("status")))


def unit_key(unit: Unit, settings: "SweepSettings") -> tuple:
    return (str(unit.run_dir), unit.step, unit.measure, unit.site, settings.hash(unit.measure), unit.model_sha256)


@functools.lru_cache(maxsize=None)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def model_digest(checkpoint: Path) -> str | None:
    """SHA-256 of the checkpoint's model.safetensors (None when it cannot be read); cached per size and mtime."""
    file = Path(checkpoint) / "model.safetensors"
    try:
        stat = file.stat()
        return _file_digest(str(file), stat.st_size, stat.st_mtime_ns)
    except OSError:
        return None


# ---- sites and layers ---------------------------------------------------------------------------------------


def default_sites(model: nn.Module) -> list[tuple[str, str, int]]:
    """[(site, role, layer)]: the sites by role (models.sites.role_sites), the same in every architecture:
    block_in of block 0, then per block attn_in, ffn_in, block_out. block_in of block i > 0 is left out: it is
    block_out of block i - 1, the same tensor read by block i alone, so its Hessian is the same."""
    from models.sites import ROLES, role_sites

    return [(sites[role], role, i) for i, sites in enumerate(role_sites(model)) for role in ROLES
            if role != "block_in" or i == 0]


def _layer_of(name: str) -> int | None:
    m = re.search(r"(?:^|\.)(?:layers|h)\.(\d+)(?:\.|:|$)", name)
    return int(m.group(1)) if m else None


def select_sites(model: nn.Module, pattern: str | None) -> list[tuple[str, str | None, int | None]]:
    """The role sites, or every site of models.sites.list_sites whose name matches `pattern` (for experts)."""
    if pattern is None:
        return default_sites(model)
    from models.sites import list_sites, role_sites

    roles = {site: role for block in role_sites(model) for role, site in block.items()}
    chosen = [(s, roles.get(s), _layer_of(s)) for s in list_sites(model) if re.search(pattern, s)]
    if not chosen:
        raise UserError(f"--sites {pattern!r} matches no site of {model.config.arch}; "
                        "`hessian-tools inspect CKPT` lists them")
    return chosen


# ---- planning ------------------------------------------------------------------------------------------------


def _skeleton(checkpoint: Path) -> nn.Module | None:
    """The run's model built on the meta device from its meta.json (names and module types only); None when
    the record cannot be read (its units then fail when the checkpoint is loaded, with the reason)."""
    from models.config import GPTConfig
    from models.gpt import build_model

    try:
        config = GPTConfig.from_dict(json.loads((checkpoint / "meta.json").read_text())["model_config"])
        with torch.device("meta"):
            return build_model(config)
    except Exception:  # noqa: BLE001 - any unreadable record: the load reports it
        return None


def plan(run_dirs, settings: SweepSettings) -> list[Unit]:
    """Every unit of the sweep in order (run, step, site, measure); UserError for a run dir without checkpoints.
    A checkpoint whose metadata cannot be read still gets its units (site None where the sites are unknown)."""
    from models.checkpoint import CKPT_RE, list_checkpoints
    from theory.verify import bound_layers

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
        for ckpt in found:
            step, digest = int(CKPT_RE.match(ckpt.name).group(1)), model_digest(ckpt)
            unit = functools.partial(Unit, run_dir, ckpt, step, model_sha256=digest)
            measures = settings.measures()
            at_sites = [m for m in measures if m.startswith("activation.")]  # measured site by site
            skeleton = _skeleton(ckpt) if at_sites or "bound.hxx" in measures else None
            for m in measures:
                if m in at_sites[:1]:
                    sites = select_sites(skeleton, settings.sites) if skeleton is not None else [(None, None, None)]
                    units += [unit(a, s, r, i) for s, r, i in sites for a in at_sites]
                elif m == "bound.hxx":
                    layers = bound_layers(skeleton, settings.layers) if skeleton is not None else [(None, None)]
                    units += [unit(m, name, kind, None if name is None else _layer_of(name)) for name, kind in layers]
                elif m not in at_sites:
                    units.append(unit(m))
    return units


# ---- records -------------------------------------------------------------------------------------------------


def _provenance(unit: Unit, settings: SweepSettings, config: dict | None, batches_spec: dict,
                train_seed=None) -> dict:
    return {"run_dir": str(unit.run_dir), "run": unit.run_dir.name, "arch": (config or {}).get("arch"),
            "model": config, "step": unit.step, "checkpoint": str(unit.checkpoint), "model_sha256": unit.model_sha256,
            "train_seed": train_seed, "version": __version__, "seed": settings.seed, "batches": batches_spec,
            "dtype": settings.dtype, "measure": unit.measure, "site": unit.site, "site_role": unit.role,
            "layer": unit.layer, "settings_hash": settings.hash(unit.measure)}


def _recorded(checkpoint: Path) -> tuple[dict | None, int | None]:
    """(model config, training seed) from meta.json, or None for what cannot be read."""
    try:
        meta = json.loads((checkpoint / "meta.json").read_text())
    except (OSError, ValueError):
        return None, None
    config = meta.get("model_config") if isinstance(meta, dict) else None
    seed = meta.get("seed") if isinstance(meta, dict) else None
    return (config if isinstance(config, dict) else None), (seed if isinstance(seed, int) else None)


def one_line(exc: BaseException) -> str:
    """A one-line reason: a UserError's message, else the exception's type and first line."""
    from models.checkpoint.files import first_line

    return first_line(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {first_line(exc)}"


def failure_record(unit: Unit, settings: SweepSettings, reason: str, config=None, batches_spec=None,
                   train_seed=None) -> dict:
    """A unit that could not be measured: status "failed: REASON", value null, the reason in payload["message"]."""
    est = Estimate(QUANTITY[unit.measure], None, None, "none", False, 0, 0.0, {}, payload={"message": reason},
                   status=f"failed: {reason}")
    return est.with_provenance(**_provenance(unit, settings, config, batches_spec or {}, train_seed)).to_dict()


def pending_units(units, records, settings: SweepSettings) -> list[Unit]:
    """The units without a record of status "ok" among `records`."""
    done = {record_key(r) for r in records if r.get("status") == "ok"}
    return [u for u in units if unit_key(u, settings) not in done]


# ---- the sweep -----------------------------------------------------------------------------------------------


def sweep(run_dirs, out, settings: SweepSettings = SweepSettings(), progress: bool = True, log=None) -> dict:
    """Measure every pending unit of `plan(run_dirs, settings)`, appending one record per unit to `out`.

    Returns {"total", "skipped", "measured", "failed", "out", "wall_time_s"}: "failed" counts the units whose
    record is a failure (written now, or already in the file with the same reason). A checkpoint that does not
    load fails its units and the sweep goes on with the next one; each failure is one line on `log` (stderr).
    """
    from tqdm import tqdm

    from models.checkpoint import load_checkpoint

    log = log or sys.stderr
    out = Path(out)
    start = time.perf_counter()
    units = plan(run_dirs, settings)
    existing = read_records(out)
    pending = pending_units(units, existing, settings)
    failures = {write_key(r) for r in existing if r.get("status") != "ok"}
    counts = {"total": len(units), "skipped": len(units) - len(pending), "measured": 0, "failed": 0}
    measurer, batch_cache = Measurer(settings), {}

    def write(record: dict):
        ok = record["status"] == "ok"
        if not ok:
            counts["failed"] += 1
            p = record["provenance"]
            print(f"hessian-tools sweep: {p['checkpoint']} {p['measure']} {p['site'] or ''}: "
                  f"{record['status']}".replace("  ", " "), file=log)
            if write_key(record) in failures:
                return
            failures.add(write_key(record))
        if append_record(out, record, key=write_key):
            counts["measured"] += ok
        elif ok:
            counts["skipped"] += 1  # another sweep wrote it meanwhile

    by_checkpoint: dict = {}
    for unit in pending:
        by_checkpoint.setdefault(unit.checkpoint, []).append(unit)
    bar = tqdm(total=len(units), initial=counts["skipped"], file=log, disable=not progress, unit="unit",
               desc="sweep", dynamic_ncols=True)
    try:
        for checkpoint, todo in by_checkpoint.items():
            config, train_seed = _recorded(checkpoint)
            try:
                ckpt = load_checkpoint(checkpoint, settings.token_sources())
                run_key = str(todo[0].run_dir)
                if run_key not in batch_cache:
                    batch_cache[run_key] = ckpt.measurement_batches(settings.n_batches, settings.batch_size,
                                                                    settings.seq_len, seed=settings.seed)
            except Exception as exc:  # noqa: BLE001 - one bad checkpoint fails its units, never the sweep
                reason = f"cannot load checkpoint: {one_line(exc)}"
                for unit in todo:
                    write(failure_record(unit, settings, reason, config, train_seed=train_seed))
                bar.update(len(todo))
                continue
            batches = batch_cache[run_key]
            config = ckpt.config.to_dict()
            spec = {"n_batches": settings.n_batches, "batch_size": settings.batch_size,
                    "seq_len": int(batches[0][0].shape[-1]), "seed": settings.seed, "split": "held-out",
                    "fused": settings.fuse_batches}
            for unit in todo:
                bar.set_postfix_str(f"{unit.run_dir.name} step {unit.step} {unit.measure} {unit.site or ''}".strip())
                try:
                    est = measurer.measure(unit, ckpt, batches)
                    if est.status == "ok" and est.value is None:
                        raise UserError(f"{unit.measure} produced no value")
                except Exception as exc:  # noqa: BLE001 - the unit fails with its reason; the sweep goes on
                    write(failure_record(unit, settings, one_line(exc), config, spec, train_seed))
                else:
                    record = est.with_provenance(**_provenance(unit, settings, config, spec, train_seed),
                                                 tokens=ckpt.token_provenance())
                    write(record.to_dict())
                bar.update(1)
    finally:
        bar.close()
    return {**counts, "out": str(out), "wall_time_s": time.perf_counter() - start}
