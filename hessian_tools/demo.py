"""The end-to-end experiment behind `hessian-tools demo`, `hessian-tools figures` and the notebooks.

An experiment at a named scale lives in one directory ROOT:
  ROOT/runs/{arch}/seed_{s}/  one training run per architecture and training seed (models.train), checkpoints
                              every save_every steps;
  ROOT/lr_sweep/              the learning-rate sweep over the same seeds (models.lr_sweep):
                              ROOT/lr_sweep/{arch}/lr_{lr}/seed_{s}/ and lr_sweep.json;
  ROOT/results.jsonl          the sweep records (hessian_tools.sweep), measured as the scale's `measurements`
                              say: which measures at which checkpoints (every one before the last, or the last)
                              of which seeds, with or without the jackknife;
  ROOT/timing.json            the wall time and load average of each phase the first time it ran.
Every step reuses what is there: a completed or diverged run is not retrained, a measured unit not remeasured,
so a second call (or a call after an interruption) only does what is missing. Independent tasks (runs, sweeps
of different runs) go to `jobs` worker processes of one thread each (training always runs on one thread, so
its numbers do not depend on `jobs`); the results file takes concurrent appends.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from hessian_tools.errors import UserError
from hessian_tools.schema import Float, MapOf, Obj
from models.config import ARCHS


@dataclass(frozen=True)
class Measurement:
    """One sweep of an experiment: the measures `what` (groups or measure names, hessian_tools.sweep) at the
    checkpoints `at` ("last", "before_last": every one but the last, "all") of the runs of the first `seeds`
    training seeds (None = all), with `n_groups` jackknife groups (0 = none)."""

    what: tuple
    at: str = "last"
    n_groups: int = 0
    seeds: int | None = None


@dataclass(frozen=True)
class Scale:
    """Sizes of one experiment: train = TrainConfig fields (besides arch and seed), seeds = training seeds (0, 1,
    ...), lrs / lr_steps = the lr sweep (over the same seeds), sweep = SweepSettings fields shared by every
    measurement, measurements = what is measured where."""

    name: str
    train: dict
    seeds: int
    lrs: tuple
    lr_steps: int
    sweep: dict
    measurements: tuple
    archs: tuple = ARCHS


# The demo's plan (cut to fit its 10 minutes on 2 cores): over training, the raw and the layer-scaled lambda_max
# of the first seed; at the last checkpoint of every seed, those with the jackknife, the other comparable measures
# and the activation sites (attention input, FFN input, block output of every block); for the first seed the
# sample-size curve, the density and the bound (on the query maps). The study's plan: everything at every seed,
# the bound on every layer.
BRANCH_AND_OUTPUT_SITES = r"(attention|attn|feed_forward|mlp):in$|^(layers|transformer\.h)\.\d+:out$"
QUERY_MAPS = r"\.(wq|snq|c_attn|c_q)$"
_PLAN = (Measurement(("params.lambda_max", "layer.lambda_max"), at="before_last", seeds=1),
         Measurement(("params.lambda_max", "layer.lambda_max"), n_groups=8),
         Measurement(("elementwise.lambda_max", "adam", "activation")),
         Measurement(("sample_size", "density"), seeds=1),
         Measurement(("bound",), seeds=1))
_STUDY_PLAN = (Measurement(("params.lambda_max", "layer.lambda_max"), at="before_last"), _PLAN[1],
               Measurement(("elementwise.lambda_max", "adam", "activation", "sample_size", "density")),
               Measurement(("bound",)))
_SWEEP = dict(n_batches=8, batch_size=1, dtype="float64", tol=1e-3, fuse_batches=True, sites=BRANCH_AND_OUTPUT_SITES)
_SWEEP_FULL = dict(_SWEEP, density_probes=2, density_iter=40, density_grid=(-30.0, 120.0, 1501), density_width=0.3)
SCALES = {
    # the test scale: dim 16, 1 layer, 20 steps, 2 checkpoints, one seed, the bound on the query map only
    "tiny": Scale("tiny", dict(dim=16, n_layers=1, n_heads=2, seq_len=8, batch_size=4, steps=20, save_every=10,
                               warmup=2, lr=1e-2), 1, (1e-2, 3e-1), 10,
                  dict(_SWEEP, layers=QUERY_MAPS, density_probes=2, density_iter=12,
                       density_grid=(-20.0, 80.0, 201), density_width=2.0), _PLAN),
    # the notebooks' default when no results are given: a few minutes on 2 cores
    "small": Scale("small", dict(dim=32, n_layers=2, n_heads=4, seq_len=32, batch_size=8, steps=120, save_every=40,
                                 warmup=12, lr=3e-3), 1, (3e-2, 0.3, 1.0), 40,
                   dict(_SWEEP_FULL, density_iter=30, density_grid=(-30.0, 120.0, 601)), _PLAN),
    # the demo and the committed figures: dim 64, 2 layers, context 32, 200 steps, 3 seeds
    "full": Scale("full", dict(dim=64, n_layers=2, n_heads=4, seq_len=32, batch_size=16, steps=200, save_every=50,
                               warmup=20, lr=3e-3), 3, (0.1, 0.2, 0.4, 0.7, 1.0), 80,
                  dict(_SWEEP_FULL, layers=QUERY_MAPS), _PLAN),
    # the larger multi-seed study: context 64, 300 steps, 5 seeds, a finer lr grid, 16 batches, the study's plan
    "study": Scale("study", dict(dim=64, n_layers=2, n_heads=4, seq_len=64, batch_size=16, steps=300, save_every=75,
                                 warmup=30, lr=3e-3), 5, (3e-2, 1e-1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.4), 80,
                   dict(_SWEEP_FULL, n_batches=16, density_probes=3), _STUDY_PLAN),
}
DEFAULT_ROOT = Path("demo_runs")
TIMING_FILE = "timing.json"
TIMING = MapOf(Obj({"wall_time_s": Float(low=0)}, extra=True))  # ROOT/timing.json: {phase: {"wall_time_s", ...}}


def _worker_init():
    import torch

    torch.set_num_threads(1)


@contextmanager
def _one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_task(settings: dict, run_dir: str) -> tuple:
    from models.train import TrainConfig, train

    start = time.perf_counter()
    with _one_thread():  # the same arithmetic in a worker process and in this one
        result = train(TrainConfig(**settings), run_dir, progress=False)
    return run_dir, result.status, result.step, time.perf_counter() - start


def _sweep_task(run_dir: str, out: str, settings) -> dict:
    from hessian_tools.sweep import sweep

    return sweep([run_dir], out, settings, progress=False)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


@dataclass
class Experiment:
    """One experiment: `scale` (a SCALES name) in `root` (default demo_runs/{scale}); `jobs` worker processes
    (0 = up to 2); `archs` (default all five); `seeds` training seeds 0 .. seeds - 1 (default the scale's);
    `steps` replaces the scale's training steps (checkpoints then every steps // 3)."""

    scale: str = "full"
    root: Path | None = None
    jobs: int = 0
    archs: tuple | None = None
    steps: int | None = None
    seeds: int | None = None
    log: object = field(default=None, repr=False)

    def __post_init__(self):
        if self.scale not in SCALES:
            raise UserError(f"unknown scale {self.scale!r}; choose one of {', '.join(SCALES)}")
        self.root = Path(self.root) if self.root is not None else DEFAULT_ROOT / self.scale
        if self.jobs < 0:
            raise UserError(f"--jobs must be 0 (up to 2) or a positive number of processes, got {self.jobs}")
        self.jobs = self.jobs or min(2, os.cpu_count() or 1)
        self.archs = tuple(self.archs or SCALES[self.scale].archs)
        unknown = [a for a in self.archs if a not in ARCHS]
        if unknown:
            raise UserError(f"unknown architecture {unknown[0]!r}; choose among {', '.join(ARCHS)}")
        self.seeds = self.seeds if self.seeds is not None else SCALES[self.scale].seeds
        if self.seeds < 1:
            raise UserError(f"--seeds must be at least 1, got {self.seeds}")
        if self.steps is not None and self.steps < 3:
            raise UserError(f"--steps must be at least 3, got {self.steps}")
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

    def run_dir(self, arch: str, seed: int) -> Path:
        return self.root / "runs" / arch / f"seed_{seed}"

    def run_dirs(self, seeds: int | None = None) -> dict:
        """{(arch, seed): run dir} of the main runs (of the first `seeds` seeds)."""
        return {(a, s): self.run_dir(a, s) for a in self.archs for s in range(min(seeds or self.seeds, self.seeds))}

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

    @contextmanager
    def _timed(self, phase: str, **details):
        """Record the wall time and load average of `phase` in ROOT/timing.json."""
        before, start = load_average(), time.perf_counter()
        yield
        entry = {"wall_time_s": round(time.perf_counter() - start, 1), "load_average_before": before,
                 "load_average_after": load_average(), "jobs": self.jobs, "cores": os.cpu_count(), **details}
        self.record_timing({phase: entry})

    def record_timing(self, entries: dict):
        timing = self.timing()
        file = self.root / TIMING_FILE
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps({**timing, **entries}, indent=1))

    def timing(self) -> dict:
        """ROOT/timing.json checked against TIMING ({} when there is none yet)."""
        from models.schemas import read_json

        file = self.root / TIMING_FILE
        return read_json(file, TIMING, "experiment's timing record") if os.path.lexists(file) else {}

    def _train_settings(self, arch: str, seed: int, **changes) -> dict:
        settings = {**self.spec.train, "arch": arch, "seed": seed, "norm_backend": "torch", "device": "cpu"}
        if self.steps is not None:
            settings.update(steps=self.steps, save_every=max(1, self.steps // 3),
                            warmup=min(settings["warmup"], max(1, self.steps // 10)))
        return {**settings, **changes}

    def _lr_base(self) -> dict:
        steps = self.spec.lr_steps
        return self._train_settings(self.archs[0], 0, steps=steps, save_every=0, warmup=max(1, steps // 10))

    def train_all(self, lr_sweep: bool = True):
        """Train (or reuse) the main runs and, with `lr_sweep`, the lr sweep's runs, longest first."""
        from models.lr_sweep import run_dir_for

        tasks = [(self._train_settings(a, s), str(d)) for (a, s), d in self.run_dirs().items()]
        if lr_sweep:
            base = self._lr_base()
            tasks += [({**base, "arch": a, "lr": lr, "seed": s}, str(run_dir_for(self.lr_dir, a, lr, s)))
                      for a in self.archs for lr in self.spec.lrs for s in range(self.seeds)]
        todo = sorted((t for t in tasks if not _finished(Path(t[1]))), key=lambda t: -t[0]["steps"])
        if not todo:
            return
        self.say(f"training {len(todo)} runs in {self.jobs} processes")
        with self._timed("train", runs=len(todo)):
            for run_dir, status, step, seconds in self._map(_train_task, todo):
                if status != "completed":
                    self.say(f"  {run_dir}: {status} after {step} steps ({seconds:.0f} s)")

    def lr_sweep(self) -> dict:
        """The lr sweep's record (models.lr_sweep), training what is missing."""
        from models.lr_sweep import lr_sweep
        from models.train import TrainConfig

        self.train_all()
        with _one_thread():
            return lr_sweep(self.archs, self.spec.lrs, self.lr_dir, TrainConfig(**self._lr_base()),
                            seeds=range(self.seeds), progress=False)

    def checkpoint_steps(self) -> list[int]:
        train = self._train_settings(self.archs[0], 0)
        every = train["save_every"] or train["steps"]
        return sorted({*range(every, train["steps"] + 1, every), train["steps"]})

    def sweep_settings(self, m: Measurement):
        from hessian_tools.sweep import SweepSettings

        steps = {"last": (-1,), "all": None, "before_last": tuple(self.checkpoint_steps()[:-1])}[m.at]
        return SweepSettings(**{**self.spec.sweep, "what": m.what, "steps": steps, "n_groups": m.n_groups})

    def plans(self) -> list[tuple]:
        """[(run dir, SweepSettings)] of every measurement."""
        return [(d, self.sweep_settings(m)) for m in self.spec.measurements for d in self.run_dirs(m.seeds).values()]

    def measure(self):
        """Sweep the runs as the scale's measurements say (reusing what is measured)."""
        from hessian_tools.results_io import read_records
        from hessian_tools.sweep import pending_units, plan

        records = read_records(self.results)
        tasks = [(str(d), str(self.results), s) for d, s in self.plans() if pending_units(plan([d], s), records, s)]
        if not tasks:
            return
        heavy = {"bound": 3, "density": 2}  # first, so that the worker processes finish together
        tasks.sort(key=lambda t: -max(heavy.get(w, 1) for w in t[2].what) - (t[2].n_groups > 0))
        self.say(f"sweeping {len(self.run_dirs())} runs into {self.results} in {self.jobs} processes")
        with self._timed("sweep", tasks=len(tasks)):
            summaries = self._map(_sweep_task, tasks)
        measured, failed = (sum(s[k] for s in summaries) for k in ("measured", "failed"))
        self.say(f"  {measured} measured, {sum(s['skipped'] for s in summaries)} reused, {failed} failed")

    def prepare(self, lr_sweep: bool = True) -> "Experiment":
        """Everything the figures need (the lr sweep only with `lr_sweep`), reusing what exists."""
        self.train_all(lr_sweep)
        self.measure()
        return self

    # -- reading -----------------------------------------------------------------------------------------------
    def records(self) -> list[dict]:
        """The results of this experiment's runs measured with its current settings on their current models."""
        from hessian_tools.results_io import read_records
        from hessian_tools.sweep import model_digest
        from models.checkpoint import list_checkpoints

        wanted = {(str(d.resolve()), s.hash(m)) for d, s in self.plans() for m in s.measures()}
        models = {model_digest(c) for d in self.run_dirs().values() for c in list_checkpoints(d)}
        return [r for r in read_records(self.results)
                if (r["provenance"].get("run_dir"), r["provenance"].get("settings_hash")) in wanted
                and r["provenance"].get("model_sha256") in models]

    def metrics(self) -> dict:
        """{(arch, seed): metrics lines of the main run}."""
        from models.train import METRICS_FILE, read_metrics

        return {key: read_metrics(d / METRICS_FILE) for key, d in self.run_dirs().items()}

    def lr_curves(self, record: dict) -> dict:
        """{(arch, lr, seed): [(step, loss)]} of the lr sweep's runs."""
        from models.lr_sweep import run_dir_for
        from models.train import METRICS_FILE, read_metrics

        return {(a, r["lr"], r["seed"]): [(m["step"], m["loss"]) for m in
                                          read_metrics(run_dir_for(self.lr_dir, a, r["lr"], r["seed"]) / METRICS_FILE)]
                for a, entry in record["archs"].items() for r in entry["runs"]}

    def describe(self) -> dict:
        """The settings of this experiment, as the results bundle records them."""
        import dataclasses

        from hessian_tools import __version__

        spec = self.spec
        return {"scale": self.scale, "archs": list(self.archs), "seeds": list(range(self.seeds)),
                "train": self._train_settings("ARCH", 0), "lr_sweep": {**self._lr_base(), "lrs": list(spec.lrs)},
                "sweep": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.sweep.items()},
                "measurements": [dataclasses.asdict(m) for m in spec.measurements],
                "checkpoint_steps": self.checkpoint_steps(), "version": __version__, "timing": self.timing()}


def _finished(run_dir: Path) -> bool:
    from models.train import read_status

    return (read_status(run_dir) or {}).get("status") in ("completed", "diverged")


def results_of(exp: Experiment, eos: bool = False):
    """The experiment's results (hessian_tools.results_bundle.Results), preparing what is missing; with `eos`
    also the edge-of-stability experiment in ROOT/eos (hessian_tools.eos, at this scale, "full" for "study")."""
    from hessian_tools.results_bundle import Results

    exp.prepare()
    lr_record = exp.lr_sweep()
    summary = None
    if eos:
        from hessian_tools.eos import SCALES as EOS_SCALES, EosExperiment

        scale = exp.scale if exp.scale in EOS_SCALES else "full"
        summary = EosExperiment(scale, exp.root, exp.archs, exp.jobs, log=exp.log).prepare().summary()
    return Results.of(exp.records(), lr_record, exp.lr_curves(lr_record), exp.metrics(), exp.describe(),
                      root=exp.root, eos=summary)


def demo(exp: Experiment, figures_out=None, out=sys.stdout) -> dict:
    """Train, lr-sweep, measure and verify (reusing what is there), then print the table and the figures.
    From an empty experiment directory the whole call's wall time is recorded (timing.json: "demo")."""
    from hessian_tools import findings, plotting

    start, before, empty = time.perf_counter(), load_average(), not (exp.root / "runs").exists()
    results = results_of(exp)
    if empty:
        exp.record_timing({"demo": {"wall_time_s": round(time.perf_counter() - start, 1), "load_average_before":
                                    before, "load_average_after": load_average(), "jobs": exp.jobs,
                                    "cores": os.cpu_count(), "seeds": exp.seeds, "archs": list(exp.archs)}})
        results.experiment["timing"] = exp.timing()
    summary = findings.summarize(results)
    paths = plotting.all_figures(results, figures_out or exp.root / "figures")
    print(findings.format_table(summary), file=out)
    print("\nfigures:", file=out)
    for p in paths:
        print(f"  {p}", file=out)
    print(f"\nresults: {exp.results}  (wall time {time.perf_counter() - start:.0f} s)", file=out)
    return {"summary": summary, "figures": [str(p) for p in paths], "wall_time_s": time.perf_counter() - start}
