"""The edge-of-stability experiment (Cohen et al., ICLR 2021, Figure 1) on the five architectures.

Full-batch gradient descent (`train --optimizer sgd`, no momentum, weight decay or clipping) on `train_subset`
fixed sequences of the embedded corpus, constant learning rate without warm-up, the sharpness lambda_max(H) of
that same full-batch loss tracked every `track_every` steps (hessian_tools.tracking); one run per (architecture,
lr, seed) in ROOT/eos/{arch}/lr_{lr}/seed_{seed}/, reused when finished. Gradient descent on a quadratic is
stable iff lambda_max < 2 / lr; Cohen et al. observe the sharpness rise to 2 / lr ("progressive sharpening")
and hover there ("edge of stability") while the loss keeps falling, non-monotonically.

`EosExperiment(scale, root).prepare().summary()` gives the small JSON record that `figure` plots (sharpness
against step with the 2 / lr lines, the loss beneath, a column per architecture) and `findings` turns into the
figures/README.md section. The raw parameter-space sharpness is what gradient descent's stability depends on,
in the coordinates it steps in; it is not invariant to reparametrisations (a SimpleNorm weight W -> cW moves its
block of H as 1 / c^2), so architectures are compared here by what their runs do at the same lr: whether
lambda_max reaches and tracks 2 / lr, whether the run diverges, the loss they reach.
`hessian-tools figures` runs it with the other figures (its summary in OUT/results/eos.json, hessian_tools.
results_bundle); `python -m hessian_tools.eos --scale full --out DIR` runs it alone and writes DIR/eos.json, the
figure and the section.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hessian_tools.errors import UserError
from models.config import ARCHS

SECTION = "eos"
NEAR = (0.5, 2.0)  # "at 2 / lr": lambda_max / (2 / lr) within a factor 2 of it


@dataclass(frozen=True)
class EosScale:
    """train: TrainConfig fields shared by every run (besides arch, lr, seed); lrs and seeds of the grid."""

    name: str
    train: dict
    lrs: tuple
    seeds: tuple


_GD = dict(optimizer="sgd", warmup=0, schedule="constant", save_every=0, norm_backend="torch", device="cpu")
SCALES = {
    "tiny": EosScale("tiny", dict(_GD, dim=16, n_layers=1, n_heads=2, seq_len=8, train_subset=8, batch_size=8,
                                  steps=8, track_every=4, track_hvps=6), (0.3, 1.0), (0,)),
    "small": EosScale("small", dict(_GD, dim=32, n_layers=2, n_heads=4, seq_len=32, train_subset=32, batch_size=32,
                                    steps=100, track_every=10), (0.3, 1.0), (0,)),
    "full": EosScale("full", dict(_GD, dim=32, n_layers=2, n_heads=4, seq_len=32, train_subset=32, batch_size=32,
                                  steps=200, track_every=10), (0.3, 1.0), (0, 1, 2)),
}


@dataclass
class EosExperiment:
    """The grid of SCALES[scale] for `archs` (default all five) in ROOT/eos (root default demo_runs/SCALE);
    `jobs` worker processes (0 = up to 2)."""

    scale: str = "full"
    root: Path | None = None
    archs: tuple | None = None
    jobs: int = 0
    log: object = None

    def __post_init__(self):
        from hessian_tools.demo import Experiment

        if self.scale not in SCALES:
            raise UserError(f"unknown eos scale {self.scale!r}; choose one of {', '.join(SCALES)}")
        self._demo = Experiment(self.scale, self.root, jobs=self.jobs, archs=self.archs, log=self.log)
        self.root, self.archs = Path(self._demo.root) / "eos", tuple(self._demo.archs)

    @property
    def spec(self) -> EosScale:
        return SCALES[self.scale]

    def run_dir(self, arch: str, lr: float, seed: int) -> Path:
        return self.root / arch / f"lr_{lr:g}" / f"seed_{seed}"

    def grid(self) -> list[tuple]:
        return [(a, lr, s) for a in self.archs for lr in self.spec.lrs for s in self.spec.seeds]

    def prepare(self) -> "EosExperiment":
        """Train every run of the grid not finished yet (worker processes, as the demo's runs)."""
        from hessian_tools.demo import _finished, _train_task

        todo = [({**self.spec.train, "arch": a, "lr": lr, "seed": s}, str(self.run_dir(a, lr, s)))
                for a, lr, s in self.grid() if not _finished(self.run_dir(a, lr, s))]
        if todo:
            self._demo.say(f"eos: {len(todo)} full-batch gradient-descent runs, tracked, in {self._demo.jobs} "
                           "processes")
            for run_dir, status, step, seconds in self._demo._map(_train_task, todo):
                self._demo.say(f"  {run_dir}: {status} after {step} steps ({seconds:.0f} s)")
        return self

    def summary(self) -> dict:
        """{"scale", "settings", "lrs", "seeds", "archs", "runs": [per run: arch, lr, seed, status, step, reason,
        threshold (2 / lr), wall_time_s, sharpness [[step, value, lo, hi]], loss [[step, loss]]]} (runs present
        only). Loss [s, L]: the full-batch loss at the weights after s updates."""
        from models.train import CONFIG_FILE, METRICS_FILE, STATUS_FILE, read_metrics, read_status

        runs = []
        for arch, lr, seed in self.grid():
            run_dir = self.run_dir(arch, lr, seed)
            status = read_status(run_dir)
            if status is None:
                continue
            sharp = read_metrics(run_dir / METRICS_FILE, kind="sharpness")
            runs.append({
                "arch": arch, "lr": lr, "seed": seed, "status": status["status"], "step": status["step"],
                "reason": status.get("reason"), "threshold": 2 / lr,
                "wall_time_s": (run_dir / STATUS_FILE).stat().st_mtime - (run_dir / CONFIG_FILE).stat().st_mtime,
                "sharpness": [[m["step"], m["value"], *(m["interval"] or [None, None])] for m in sharp],
                "loss": [[m["step"] - 1, m["loss"]] for m in read_metrics(run_dir / METRICS_FILE)],
            })
        return {"scale": self.scale, "settings": self.spec.train, "lrs": list(self.spec.lrs),
                "seeds": list(self.spec.seeds), "archs": list(self.archs), "runs": runs}


# ---- what the runs show ----------------------------------------------------------------------------------------


def run_stats(run: dict) -> dict:
    """ratio lambda_max / (2 / lr): its median over the second half of the run's measurements, its maximum, the
    first step at which it reached NEAR[0], the fraction of later measurements within NEAR; the final loss."""
    points = [(s, v / run["threshold"]) for s, v, *_ in run["sharpness"] if v is not None]
    tail = [r for s, r in points if s >= run["step"] / 2] or [r for _, r in points] or [float("nan")]
    reached = next((s for s, r in points if r >= NEAR[0]), None)
    after = [r for s, r in points if reached is not None and s >= reached]
    return {"hover": statistics.median(tail), "peak": max((r for _, r in points), default=float("nan")),
            "reached_at": reached, "near": sum(NEAR[0] <= r <= NEAR[1] for r in after) / len(after) if after else 0.0,
            "final_loss": run["loss"][-1][1] if run["loss"] else None, "initial": points[0][1] if points else None}


def findings(summary: dict) -> str:
    """The figures/README.md section: settings, wall time, one table row per (arch, lr) over seeds, and what the
    numbers say, each sentence computed from them."""
    from models.train_config import field_defaults

    runs, spec = summary["runs"], {**field_defaults(), **summary["settings"]}
    wall = sum(r["wall_time_s"] for r in runs)
    lines = ["## Edge of stability (`eos`)", "",
             f"Made by `hessian-tools figures` (notebook `07_eos.ipynb`, eos scale {summary['scale']}) from "
             f"`figures/results/eos.json`; `python -m hessian_tools.eos` runs it alone. Full-batch gradient descent (no momentum, weight decay or "
             f"clipping) on {spec['train_subset']} fixed training sequences of {spec['seq_len']} tokens (embedded "
             f"corpus, char level), dim {spec['dim']}, layers {spec['n_layers']}, heads {spec['n_heads']}, "
             f"{spec['steps']} steps at constant lr {', '.join(f'{x:g}' for x in summary['lrs'])}, seeds "
             f"{', '.join(map(str, summary['seeds']))}; lambda_max of the Hessian of that full-batch loss every "
             f"{spec['track_every']} steps (float32 Lanczos, warm-started, stopped at relative interval width "
             f"{spec['track_tol']:g} or {spec['track_hvps']} HVPs). {len(runs)} runs, "
             f"{wall / 60:.1f} min of run time in all (the sum over runs; 2 worker processes on 2 shared cores).", "",
             f"Ratio = lambda_max / (2 / lr). Hover: median ratio over the second half of the run (the spread is "
             f"over seeds); reached: the first step with ratio >= {NEAR[0]}; at 2/lr: the share of the measurements "
             f"from then on with ratio in [{NEAR[0]}, {NEAR[1]}].", "",
             "| arch | lr | 2/lr | status | ratio at step 0 | reached | hover ratio | at 2/lr | peak ratio | final loss |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    groups = {}
    for r in runs:
        groups.setdefault((r["arch"], r["lr"]), []).append(r)

    def spread(values, fmt):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        return f"{statistics.median(values):{fmt}}" if len(values) == 1 else \
            f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"

    verdicts = {}
    for (arch, lr), rs in groups.items():
        stats = [run_stats(r) for r in rs]
        statuses = sorted({r["status"] for r in rs})
        reached = [s["reached_at"] for s in stats]
        lines.append(f"| {arch} | {lr:g} | {2 / lr:.3g} | {'/'.join(statuses)} ({len(rs)}) | "
                     f"{spread([s['initial'] for s in stats], '.2g')} | "
                     f"{spread(reached, '.0f') if all(x is not None for x in reached) else 'not in all'} | "
                     f"{spread([s['hover'] for s in stats], '.2f')} | {spread([s['near'] for s in stats], '.0%')} | "
                     f"{spread([s['peak'] for s in stats], '.2g')} | {spread([s['final_loss'] for s in stats], '.3f')} |")
        verdicts[(arch, lr)] = (stats, statuses, [r["status"] for r in rs])
    lines += ["", *_sentences(verdicts, summary)]
    return "\n".join(lines)


def _sentences(verdicts: dict, summary: dict) -> list[str]:
    """Statements about the table, each a computed classification of its rows."""
    def kind(stats, statuses, _):
        hover = statistics.median(s["hover"] for s in stats)
        if "diverged" in statuses:
            return "diverged"
        if all(s["reached_at"] is None for s in stats):
            return "below"  # never reached 2 / lr
        if NEAR[0] <= hover <= NEAR[1]:
            return "edge"
        return "above" if hover > NEAR[1] else "fell back"

    labels = {"edge": "rose to 2/lr and hovered there (median ratio over the second half within "
                      f"[{NEAR[0]}, {NEAR[1]}])",
              "below": "stayed below 2/lr throughout (progressive sharpening had not reached it)",
              "above": "sat above 2/lr without diverging (median ratio above " f"{NEAR[1]})",
              "fell back": f"reached 2/lr, then fell back below {NEAR[0]} x 2/lr",
              "diverged": "diverged"}
    by_kind = {}
    for (arch, lr), v in verdicts.items():
        by_kind.setdefault(kind(*v), []).append(f"{arch} at lr {lr:g}")
    out = ["What the runs show (computed from the table):", ""]
    out += [f"- {labels[k]}: {', '.join(v)}." for k, v in by_kind.items()]
    losses = {}
    top = max(summary["lrs"])
    for (arch, lr), (stats, statuses, _) in verdicts.items():
        if lr == top and "diverged" not in statuses:
            losses[arch] = statistics.median(s["final_loss"] for s in stats)
    if losses:
        ranked = sorted(losses, key=losses.get)
        out.append(f"- At the largest lr ({top:g}) the final full-batch loss ranks "
                   + " < ".join(f"{a} {losses[a]:.3f}" for a in ranked) + ".")
    claim = _stability_claim(verdicts, summary["lrs"])
    if claim:
        out.append("- The paper's claim that SimpleNorm keeps larger learning rates stable, judged by divergence "
                   "under full-batch GD (diverged seeds / seeds, per lr): " + "; ".join(claim) + ". The ratio to "
                   "2/lr places each run against its own stability threshold; raw lambda_max is not comparable "
                   "across architectures (a SimpleNorm weight W -> cW moves its block as 1 / c^2).")
    return out


def _stability_claim(verdicts: dict, lrs) -> list[str]:
    """Per (SimpleNorm, baseline) pair with runs: diverged seeds of each at every lr, and the verdict: supports
    when the SimpleNorm model diverged on fewer seeds at some lr and on more at none, contradicts the other way
    round, cannot settle otherwise (none diverged, or mixed)."""
    from hessian_tools.findings import PAIRS

    def diverged(arch, lr):
        stats_statuses = verdicts.get((arch, lr))
        if stats_statuses is None:
            return None
        return sum(s == "diverged" for s in stats_statuses[2]), len(stats_statuses[2])

    out = []
    for simple, base in PAIRS:
        counts = [(lr, diverged(simple, lr), diverged(base, lr)) for lr in sorted(lrs)]
        counts = [(lr, a, b) for lr, a, b in counts if a and b]
        if not counts:
            continue
        fewer = any(a[0] / a[1] < b[0] / b[1] for _, a, b in counts)
        more = any(a[0] / a[1] > b[0] / b[1] for _, a, b in counts)
        verdict = "supports" if fewer and not more else "contradicts" if more and not fewer else "cannot settle"
        detail = ", ".join(f"lr {lr:g}: {a[0]}/{a[1]} vs {b[0]}/{b[1]}" for lr, a, b in counts)
        out.append(f"{simple} vs {base} {verdict} ({detail})")
    return out


# ---- the figure -------------------------------------------------------------------------------------------------


def figure(summary: dict, out, name: str = "eos") -> list[Path]:
    """Cohen et al.'s Figure 1 per architecture: lambda_max against step (log scale; the band is the reported
    interval) with a dashed 2 / lr line per lr in the lr's colour, and the full-batch loss beneath; one line per
    seed."""
    import matplotlib.pyplot as plt

    from hessian_tools.plotting import save

    if not summary.get("runs"):
        raise UserError("no edge-of-stability runs in these results; `hessian-tools figures` runs them")
    archs = [a for a in ARCHS if any(r["arch"] == a for r in summary["runs"])]
    cmap = plt.get_cmap("plasma", len(summary["lrs"]) + 1)
    colour = {lr: cmap(k) for k, lr in enumerate(sorted(summary["lrs"]))}
    fig, axes = plt.subplots(2, len(archs), figsize=(3.6 * len(archs), 6), squeeze=False, sharex=True,
                             gridspec_kw={"height_ratios": (3, 2)})
    for j, arch in enumerate(archs):
        top, bottom = axes[0][j], axes[1][j]
        for lr in summary["lrs"]:
            top.axhline(2 / lr, color=colour[lr], linestyle="--", linewidth=1)
        for r in (r for r in summary["runs"] if r["arch"] == arch):
            c = colour[r["lr"]]
            pts = [p for p in r["sharpness"] if p[1] is not None]
            label = f"lr {r['lr']:g}" + (" (diverged)" if r["status"] == "diverged" else "")
            first = r["seed"] == min(summary["seeds"])
            if pts:
                top.plot([p[0] for p in pts], [p[1] for p in pts], color=c, linewidth=1.2,
                         label=label if first else None)
                band = [p for p in pts if p[3] is not None]
                top.fill_between([p[0] for p in band], [p[2] for p in band], [p[3] for p in band], color=c,
                                 alpha=0.2, linewidth=0)
            if r["loss"]:
                bottom.plot([p[0] for p in r["loss"]], [p[1] for p in r["loss"]], color=c, linewidth=1)
        top.set(title=arch, yscale="log")
        bottom.set(xlabel="step")
        top.grid(alpha=0.3)
        bottom.grid(alpha=0.3)
        top.legend(fontsize=7)
    axes[0][0].set_ylabel("sharpness $\\lambda_{max}$ (dashed: 2 / lr)")
    axes[1][0].set_ylabel("full-batch training loss")
    fig.suptitle("Full-batch gradient descent: sharpness against the stability threshold 2 / lr", fontsize=10)
    return save(fig, out, name)


def write_outputs(summary: dict, out) -> list[Path]:
    """out/eos.png and .pdf, out/eos.json (the summary) and the eos section of out/README.md; their paths."""
    from hessian_tools.benchmarks_md import write_section

    out = Path(out)
    paths = figure(summary, out)
    (out / "eos.json").write_text(json.dumps(summary, separators=(",", ":"), allow_nan=False) + "\n")
    write_section(out / "README.md", SECTION, findings(summary))
    return [*paths, out / "eos.json", out / "README.md"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="full", choices=tuple(SCALES))
    parser.add_argument("--runs", default=None, metavar="DIR", help="experiment directory (default demo_runs/SCALE)")
    parser.add_argument("--out", default="figures", metavar="DIR")
    parser.add_argument("--jobs", type=int, default=0)
    parser.add_argument("--arch", dest="archs", action="append", choices=ARCHS, default=None)
    parser.add_argument("--from-json", default=None, metavar="FILE",
                        help="rewrite the figure and README section from this summary instead of running")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.from_json:
        summary = json.loads(Path(args.from_json).read_text())
    else:
        summary = EosExperiment(args.scale, args.runs, args.archs, args.jobs).prepare().summary()
    for path in write_outputs(summary, args.out):
        print(path)
    print(f"wall time {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
