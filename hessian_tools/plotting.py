"""The paper's figures from an experiment's results (hessian_tools.results_bundle.Results); each function writes
NAME.png and NAME.pdf into `out` and returns their paths.

Records are hessian_tools.sweep dicts, full or compact (failed ones, status != "ok", are left out). Two bars,
never added together: the solver interval (`error_bar`: payload["interval"], or value +- error; for Lanczos the
lower side certified, the upper one failing with probability <= 1e-3, resting on the measured float32 rounding)
drawn thick around the estimate on all the batches, and the data interval (`data_bar`: payload["data_error"]) drawn
thin with caps around its own centre: for parameter-space measures the jackknife's bias-corrected value and
68 % interval for the population value, for activation sites the mean over batches and its 68 % t interval.
Seeds: each training seed is drawn (thin lines, or one marker each), the mean over seeds bold (or a bar).
Each architecture keeps one colour in every figure; the SimpleNorm variants are drawn solid, the baselines dashed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hessian_tools.findings import adam_factor, data_error, last_records, solver_interval  # noqa: E402
from models.config import ARCHS, SITE_ROLES  # noqa: E402

COLORS = dict(zip(ARCHS, ("tab:blue", "tab:orange", "tab:red", "tab:green", "tab:purple")))
SIMPLE = ("simplegpt", "simplegpt_gpt2")
ROLE_TITLES = {"block_in": "block input", "attn_in": "attention input", "ffn_in": "FFN input",
               "block_out": "block output"}
BARS = ("o + thick bar: estimate on all batches and its solver interval; x + thin capped bar: data interval "
        "(68 %)")


def style(arch: str) -> dict:
    return {"color": COLORS.get(arch, "black"), "linestyle": "-" if arch in SIMPLE else "--", "label": arch}


def save(fig, out, name: str) -> list[Path]:
    """Lay out, write out/name.png (150 dpi) and out/name.pdf (no creation date, so reruns give the same
    bytes); close the figure."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None})
    plt.close(fig)
    return paths


def ok(records, measure: str) -> list[dict]:
    return [r for r in records if r.get("status") == "ok" and r["provenance"].get("measure") == measure]


def error_bar(record: dict) -> tuple[float, float]:
    """(below, above): the solver interval around the value, as matplotlib's asymmetric yerr wants it."""
    lo, hi = solver_interval(record)
    return max(record["value"] - lo, 0.0), max(hi - record["value"], 0.0)


def data_bar(record: dict) -> tuple[float, float, float] | None:
    """(centre, below, above) of the record's data interval, or None when none was measured."""
    d = data_error(record)
    if d is None:
        return None
    lo, hi = d["interval"]
    return d["value"], max(d["value"] - lo, 0.0), max(hi - d["value"], 0.0)


def arch_order(arch: str) -> int:
    return ARCHS.index(arch) if arch in ARCHS else len(ARCHS)


def by_arch_seed(records) -> dict:
    """{arch: {seed: [records sorted by step]}} in ARCHS order."""
    groups = defaultdict(lambda: defaultdict(list))
    for r in records:
        groups[r["provenance"]["arch"]][r["provenance"].get("train_seed")].append(r)
    return {a: {s: sorted(rs, key=lambda r: r["provenance"]["step"]) for s, rs in sorted(groups[a].items(),
                                                                                        key=lambda kv: str(kv[0]))}
            for a in sorted(groups, key=arch_order)}


def _errorbar(ax, x, records, **kw):
    """Markers at the records' values with their solver intervals."""
    yerr = np.array([error_bar(r) for r in records]).T
    ax.errorbar(x, [r["value"] for r in records], yerr=yerr, elinewidth=2.5, capsize=0, **kw)


def over_training(ax, records, measure: str, title: str):
    """Each seed thin with its solver intervals, the mean over seeds bold, one colour per architecture."""
    for arch, seeds in by_arch_seed(ok(records, measure)).items():
        st = style(arch)
        steps = defaultdict(list)
        for rs in seeds.values():
            _errorbar(ax, [r["provenance"]["step"] for r in rs], rs, color=st["color"], linestyle=st["linestyle"],
                      linewidth=0.8, alpha=0.45, marker="o", markersize=2)
            for r in rs:
                steps[r["provenance"]["step"]].append(r["value"])
        xs = sorted(steps)
        ax.plot(xs, [np.mean(steps[x]) for x in xs], marker="o", markersize=4, linewidth=2,
                **{**st, "label": f"{arch} (mean of {len(seeds)})"})
    ax.set(title=title, xlabel="training step", yscale="log")
    ax.grid(alpha=0.3)


def at_last(ax, records, measure: str, title: str, positions=None):
    """Per architecture, each seed's last-checkpoint estimate (o, solver interval) and data interval (x), and
    the mean over seeds (a horizontal tick)."""
    chosen = last_records(records, measure)
    archs = sorted({r["provenance"]["arch"] for r in chosen}, key=arch_order)
    for i, arch in enumerate(archs):
        rs = sorted((r for r in chosen if r["provenance"]["arch"] == arch), key=lambda r: str(r["provenance"]
                                                                                             .get("train_seed")))
        color = COLORS.get(arch, "black")
        offsets = np.linspace(-0.25, 0.25, len(rs)) if len(rs) > 1 else [0.0]
        for dx, r in zip(offsets, rs):
            _errorbar(ax, [i + dx], [r], color=color, marker="o", markersize=4, linestyle="none")
            bar = data_bar(r)
            if bar is not None:
                ax.errorbar([i + dx + 0.06], [bar[0]], yerr=[[bar[1]], [bar[2]]], color=color, marker="x",
                            markersize=4, capsize=3, elinewidth=0.8, linestyle="none")
        ax.hlines(np.mean([r["value"] for r in rs]), i - 0.35, i + 0.35, color=color, linewidth=2)
    ax.set_xticks(range(len(archs)), archs, rotation=30, fontsize=7)
    ax.set(title=title, yscale="log")
    ax.grid(alpha=0.3, axis="y")
    return archs


def sample_size(ax, records):
    """Raw lambda_max on the first n batches at the last checkpoint: each seed thin, the mean bold."""
    for arch, seeds in by_arch_seed(last_records(records, "params.sample_size_curve")).items():
        st, curves = style(arch), []
        for rs in seeds.values():
            points = [(p["n_batches"], p["value"]) for p in rs[-1]["payload"]["points"] if p["value"] is not None]
            n, v = zip(*points)
            curves.append(dict(points))
            ax.plot(n, v, color=st["color"], linestyle=st["linestyle"], linewidth=0.8, alpha=0.45)
        common = sorted(set.intersection(*(set(c) for c in curves)))
        ax.plot(common, [np.mean([c[n] for c in curves]) for n in common], marker="o", linewidth=2, **st)
    ax.set(title="sample size: raw $\\lambda_{max}$ on the first n batches", xlabel="batches n", xscale="log",
           yscale="log")
    ax.grid(alpha=0.3)


def top_eigenvalue(results, out, name: str = "top_eigenvalue") -> list[Path]:
    """(a) The top eigenvalue of the parameter-space Hessian: raw and layer-scaled over training, the
    sample-size curve, and at the last checkpoint the raw and the three comparable measures."""
    records = results.records
    fig, axes = plt.subplots(2, 4, figsize=(19, 8.5))
    over_training(axes[0][0], records, "params.lambda_max", "raw $\\lambda_{max}$ (not comparable across archs)")
    over_training(axes[0][1], records, "layer.lambda_max", "layer-scaled $\\lambda_{max}(SHS)$, S = rms($W_i$)")
    sample_size(axes[0][2], records)
    axes[0][0].legend(fontsize=7)
    for ax, (measure, title) in zip(axes[1], (
            ("params.lambda_max", "raw $\\lambda_{max}$"), ("layer.lambda_max", "layer-scaled $\\lambda_{max}$"),
            ("elementwise.lambda_max", "elementwise $\\lambda_{max}$(diag|w| H diag|w|)"),
            ("adam.sharpness", "Adam $\\lambda_{max}(P^{-1}H)$"))):
        at_last(ax, records, measure, f"last checkpoint: {title}")
    limits = {r["payload"]["adam"]["threshold_peak"] for r in last_records(records, "adam.sharpness")
              if r["payload"].get("adam", {}).get("threshold_peak")}
    for limit in limits:
        axes[1][3].axhline(limit, color="gray", linewidth=1, linestyle=":")
        axes[1][3].annotate("38 / peak lr", (0, limit), fontsize=7, va="bottom")
    axes[0][3].axis("off")
    axes[0][3].text(0, 0.5, "Each seed: thin line / one marker.\nBold: the mean over seeds.\n\n" +
                    BARS.replace("; ", ";\n").replace(": ", ":\n  ") +
                    "\n  parameters: the jackknife over batch groups\n  (bias-corrected, population value)",
                    fontsize=9, va="center")
    return save(fig, out, name)


def _site_key(record):
    p = record["provenance"]
    role = p.get("site_role")
    return (p.get("layer") or 0, SITE_ROLES.index(role) if role in SITE_ROLES else len(SITE_ROLES), p["site"])


def activation_norms(results, out, name: str = "activation_norms") -> list[Path]:
    """(b) Activation-space Hessian norms at the role sites at the last checkpoint, raw and scale-free (ms x
    ||H_b||): per site, each architecture's seeds with their solver and per-batch data intervals."""
    fig, axes = plt.subplots(2, 1, figsize=(13, 8), sharex=True)
    for ax, (measure, title) in zip(axes, (("activation.spectral_norm", "raw $\\|H_b\\|$"),
                                           ("activation.scale_free", "scale-free ms $\\times\\ \\|H_b\\|$"))):
        chosen = last_records(results.records, measure)
        sites = sorted({_site_key(r) for r in chosen})
        archs = sorted({r["provenance"]["arch"] for r in chosen}, key=arch_order)
        width = 0.8 / max(1, len(archs))
        for j, arch in enumerate(archs):
            for i, key in enumerate(sites):
                rs = [r for r in chosen if r["provenance"]["arch"] == arch and _site_key(r) == key]
                for k, r in enumerate(rs):
                    x = i - 0.4 + width * (j + 0.5) + (k - (len(rs) - 1) / 2) * width / (2 * max(1, len(rs)))
                    _errorbar(ax, [x], [r], color=COLORS.get(arch), marker="o", markersize=3, linestyle="none",
                              label=arch if i == 0 and k == 0 else None)
                    bar = data_bar(r)
                    if bar is not None:
                        ax.errorbar([x], [bar[0]], yerr=[[bar[1]], [bar[2]]], color=COLORS.get(arch), marker="x",
                                    markersize=3, capsize=2, elinewidth=0.7, linestyle="none")
        labels = [f"{ROLE_TITLES.get(SITE_ROLES[r] if r < len(SITE_ROLES) else '', s)}\nlayer {layer}"
                  for layer, r, s in sites]
        ax.set_xticks(range(len(sites)), labels, fontsize=7)
        ax.set(title=f"activation-space Hessian at the last checkpoint: {title}, mean over batches", yscale="log")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7, ncol=5)
    axes[1].set_xlabel(BARS + " (per-batch t interval for the mean over batches); seeds side by side")
    return save(fig, out, name)


def bound_tightness(results, out, name: str = "bound_tightness") -> list[Path]:
    """(c) measured ||H_xx|| against the bound per layer (last checkpoint of each run, every seed), bound /
    measured, and ||C|| / ||GN|| for the SimpleNorm layers."""
    chosen = last_records(results.records, "bound.hxx")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    lo, hi = math.inf, 0.0
    for arch, seeds in by_arch_seed(chosen).items():
        for k, rs in enumerate(seeds.values()):
            st = style(arch)
            if k:
                st["label"] = None
            rs = sorted(rs, key=lambda r: r["payload"]["layer"])
            measured = [r["payload"]["measured"] for r in rs]
            bounds = [r["payload"]["bound"] for r in rs]
            axes[0].scatter(measured, bounds, s=14, color=st["color"], label=st["label"])
            lo, hi = min(lo, *measured, *bounds), max(hi, *measured, *bounds)
            axes[1].plot(range(len(rs)), [r["payload"]["ratio"] for r in rs], marker="o", markersize=3,
                         linewidth=1, **st)
            simple = [r for r in rs if r["payload"]["kind"] == "simplenorm"]
            if simple:
                axes[2].plot(range(len(simple)), [r["payload"]["c_over_gn"] for r in simple], marker="o",
                             markersize=3, linewidth=1, **st)
    if chosen:
        axes[0].plot([lo, hi], [lo, hi], color="gray", linewidth=1, label="bound = measured")
    axes[0].set(xscale="log", yscale="log", xlabel="measured $\\|H_{xx}\\|$", ylabel="bound",
                title="bound against measurement (every layer, every seed)")
    axes[1].set(yscale="log", ylabel="bound / measured", xlabel="block linear map (name order)",
                title="tightness per layer (>= 1: the bound holds)")
    axes[1].axhline(1.0, color="gray", linewidth=1)
    axes[2].set(yscale="log", ylabel="$\\|C\\| / \\|GN\\|$", xlabel="SimpleNorm layer (name order)",
                title="curvature term against Gauss-Newton")
    axes[2].axhline(1.0, color="gray", linewidth=1)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return save(fig, out, name)


def lr_sweep(results, out, name: str = "lr_sweep") -> list[Path]:
    """(d) Loss curves of the lr sweep (one panel per architecture, every seed drawn) and, per architecture,
    the largest stable lr of every seed (dots) and for all seeds (bar) beside 2 / lambda_max and Adam's
    38 / sharpness of each seed's main run."""
    record, curves = results.lr_sweep, results.curves
    archs = list(record["archs"])
    ncols = min(3, len(archs) + 1)
    nrows = math.ceil((len(archs) + 1) / ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.5 * nrows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(archs) + 1:]:
        ax.set_visible(False)
    lrs = record.get("lrs") or sorted({r["lr"] for e in record["archs"].values() for r in e["runs"]})
    cmap = plt.get_cmap("viridis", max(2, len(lrs)))
    for ax, arch in zip(axes, archs):
        labelled = set()
        for run in record["archs"][arch]["runs"]:
            points = curves.get((arch, run["lr"], run["seed"]), [])
            if points:
                steps, losses = zip(*points)
                label = None if run["lr"] in labelled else f"lr {run['lr']:g}"
                labelled.add(run["lr"])
                ax.plot(steps, losses, color=cmap(lrs.index(run["lr"])), linewidth=0.9,
                        linestyle="-" if run["stable"] else ":", label=label)
        ax.set(title=f"{arch} (dotted: unstable)", xlabel="step", ylabel="training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    ax = axes[len(archs)]
    for i, arch in enumerate(archs):
        entry = record["archs"][arch]
        if entry["largest_stable_lr"]:
            ax.bar(i, entry["largest_stable_lr"], 0.6, color="lightgray", edgecolor=COLORS.get(arch), linewidth=2,
                   label="largest lr stable for every seed" if i == 0 else None)
        per_seed = [v for v in entry["per_seed"].values() if v]
        ax.scatter([i - 0.15] * len(per_seed), per_seed, color="black", s=12, zorder=3,
                   label="each seed's largest stable lr" if i == 0 else None)
        lam = [r for r in last_records(results.records, "params.lambda_max") if r["provenance"]["arch"] == arch]
        adam = [r for r in last_records(results.records, "adam.sharpness") if r["provenance"]["arch"] == arch]
        ax.scatter([i + 0.05] * len(lam), [2 / r["value"] for r in lam], color="tab:gray", marker="v", s=14,
                   zorder=3, label="2 / $\\lambda_{max}$ (each seed)" if i == 0 else None)
        ax.scatter([i + 0.2] * len(adam), [adam_factor(r) / r["value"] for r in adam], color="tab:olive",
                   marker="^", s=14, zorder=3, label="38 / Adam sharpness (each seed)" if i == 0 else None)
        if entry["at_edge"]:
            ax.annotate("+", (i, entry["largest_stable_lr"]), fontsize=9, ha="center", va="bottom")
    ax.set_xticks(range(len(archs)), archs, rotation=30, fontsize=8)
    ax.set(yscale="log", ylabel="learning rate", title="stable lr (+: the largest tried) and edges of stability")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=6)
    return save(fig, out, name)


def densities(results, out, name: str = "density") -> list[Path]:
    """(e) SLQ eigenvalue densities of the parameter-space Hessian at each run's last checkpoint, every seed
    (same grid and width for every run, as the sweep settings fix them)."""
    from hessian_tools.results_bundle import density_grid

    chosen = last_records(results.records, "params.density")
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for arch, seeds in by_arch_seed(chosen).items():
        for k, rs in enumerate(seeds.values()):
            payload = rs[-1]["payload"]
            st = style(arch)
            st["label"] = f"{arch} (step {rs[-1]['provenance']['step']}, {len(seeds)} seeds)" if k == 0 else None
            ax.plot(density_grid(payload), [max(d, 1e-12) for d in payload["density"]], linewidth=0.9, alpha=0.8,
                    **st)
    if chosen:
        ax.set_title(f"Hessian eigenvalue density (SLQ, Gaussian width {chosen[0]['payload']['width']:g}), each seed")
    ax.set(yscale="log", xlabel="eigenvalue", ylabel="density", ylim=(1e-8, None))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, out, name)


def activation_rms(results, out, name: str = "activation_rms") -> list[Path]:
    """(f) RMS of the residual stream after each block over training, a panel per layer index: per
    architecture the mean over seeds and the band from their min to max (act_rms keyed by block name)."""
    metrics = results.metrics
    layer = lambda block: int(block.rsplit(".", 1)[-1])  # noqa: E731
    layers = sorted({layer(b) for lines in metrics.values() for m in lines for b in m.get("act_rms") or {}})
    fig, axes = plt.subplots(1, max(1, len(layers)), figsize=(4.8 * max(1, len(layers)), 3.8), squeeze=False)
    archs = sorted({a for a, _ in metrics}, key=arch_order)
    for ax, i in zip(axes[0], layers):
        for arch in archs:
            series = [{m["step"]: v for m in lines for b, v in (m.get("act_rms") or {}).items() if layer(b) == i}
                      for (a, _), lines in metrics.items() if a == arch]
            steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
            if steps:
                values = np.array([[s[t] for t in steps] for s in series])
                ax.plot(steps, values.mean(0), **{**style(arch), "label": f"{arch} ({len(series)} seeds)"})
                ax.fill_between(steps, values.min(0), values.max(0), color=COLORS.get(arch), alpha=0.2)
        ax.set(title=f"layer {i} output (residual stream)", xlabel="training step", yscale="log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("activation RMS (mean, band: min-max over seeds)")
    axes[0][0].legend(fontsize=7)
    return save(fig, out, name)


FIGURES = (top_eigenvalue, activation_norms, bound_tightness, lr_sweep, densities, activation_rms)


def all_figures(results, out) -> list[Path]:
    """Every figure of the experiment into `out` (PNG and PDF each)."""
    return [p for figure in FIGURES for p in figure(results, out)]
