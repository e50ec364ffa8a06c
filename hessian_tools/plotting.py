"""The paper's figures from sweep records, training metrics and lr sweeps; each function writes NAME.png and
NAME.pdf into `out` and returns their paths.

Records are hessian_tools.sweep dicts (failed ones, status != "ok", are left out). Error bars: sqrt(solver
error^2 + data error^2), the solver error being the Lanczos residual bound and the data error the standard
error over disjoint batch groups (payload "data_spread"), where the sweep measured one. Each architecture
keeps one colour in every figure; the SimpleNorm variants are drawn solid, the baselines dashed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from models.config import ARCHS  # noqa: E402

COLORS = dict(zip(ARCHS, ("tab:blue", "tab:orange", "tab:red", "tab:green", "tab:purple")))
SIMPLE = ("simplegpt", "simplegpt_gpt2")
ROLES = ("attn_in", "ffn_in", "block_out")
ROLE_TITLES = {"attn_in": "attention input", "ffn_in": "FFN input", "block_out": "block output (residual)"}


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


def error_bar(record: dict) -> float:
    """sqrt(solver error^2 + data standard error^2) (missing parts count 0)."""
    solver = record.get("error") or 0.0
    data = (record.get("payload", {}).get("data_spread") or {}).get("std_error") or 0.0
    return math.hypot(solver, data)


def by_run(records) -> dict:
    """{(arch, run dir): [records sorted by step]} in ARCHS order."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["provenance"]["arch"], r["provenance"]["run_dir"])].append(r)
    order = lambda key: (ARCHS.index(key[0]) if key[0] in ARCHS else len(ARCHS), key[1])  # noqa: E731
    return {k: sorted(groups[k], key=lambda r: r["provenance"]["step"]) for k in sorted(groups, key=order)}


def last_step(records) -> list[dict]:
    """Each run's records at its last measured step."""
    last = {}
    for r in records:
        run = r["provenance"]["run_dir"]
        last[run] = max(last.get(run, -1), r["provenance"]["step"])
    return [r for r in records if r["provenance"]["step"] == last[r["provenance"]["run_dir"]]]


def _series(ax, records, label_runs: bool):
    for (arch, run), rs in by_run(records).items():
        st = style(arch)
        if label_runs:
            st["label"] = f"{arch} ({Path(run).name})"
        ax.errorbar([r["provenance"]["step"] for r in rs], [r["value"] for r in rs],
                    yerr=[error_bar(r) for r in rs], marker="o", markersize=3, capsize=3, **st)


def _several_runs_per_arch(records) -> bool:
    keys = list(by_run(records))
    return len({a for a, _ in keys}) < len(keys)


def top_eigenvalue(records, out, name: str = "top_eigenvalue") -> list[Path]:
    """(a) lambda_max and ||H|| of the parameter-space Hessian over training, one line per run."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for ax, (measure, title) in zip(axes, (("params.lambda_max", "top eigenvalue $\\lambda_{max}$"),
                                           ("params.spectral_norm", "spectral norm $\\|H\\|_2$"))):
        chosen = ok(records, measure)
        _series(ax, chosen, _several_runs_per_arch(chosen))
        ax.set(title=f"parameter-space Hessian: {title}", xlabel="training step", yscale="log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return save(fig, out, name)


def activation_norms(records, out, name: str = "activation_norms") -> list[Path]:
    """(b) ||H|| at the activation sites over training: a row per site role, a column per layer."""
    chosen = ok(records, "activation.spectral_norm")
    roles = [r for r in ROLES if any(x["provenance"].get("site_role") == r for x in chosen)] or [None]
    layers = sorted({x["provenance"]["layer"] for x in chosen if x["provenance"].get("layer") is not None})
    layers = layers or [None]
    fig, axes = plt.subplots(len(roles), len(layers), figsize=(4.5 * len(layers), 3.2 * len(roles)), squeeze=False,
                             sharex=True)
    for i, role in enumerate(roles):
        for j, layer in enumerate(layers):
            ax = axes[i][j]
            cell = [x for x in chosen if (role is None or x["provenance"].get("site_role") == role)
                    and (layer is None or x["provenance"].get("layer") == layer)]
            _series(ax, cell, _several_runs_per_arch(cell))
            ax.set(title=f"layer {layer}: {ROLE_TITLES.get(role, 'all sites')}", yscale="log")
            ax.grid(alpha=0.3)
            if i == len(roles) - 1:
                ax.set_xlabel("training step")
    axes[0][0].set_ylabel("activation Hessian $\\|H\\|_2$")
    axes[0][0].legend(fontsize=7)
    return save(fig, out, name)


def bound_tightness(records, out, name: str = "bound_tightness") -> list[Path]:
    """(c) measured ||H_xx|| against the bound per layer (last checkpoint of each run), bound / measured, and
    ||C|| / ||GN|| for the SimpleNorm layers."""
    chosen = last_step(ok(records, "bound.hxx"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    groups = by_run(chosen)
    lo, hi = math.inf, 0.0
    for (arch, _), rs in groups.items():
        st = style(arch)
        st.pop("linestyle")
        measured = [r["payload"]["measured"] for r in rs]
        bounds = [r["payload"]["bound"] for r in rs]
        axes[0].scatter(measured, bounds, s=18, **st)
        lo, hi = min(lo, *measured, *bounds), max(hi, *measured, *bounds)
        axes[1].plot(range(len(rs)), [r["payload"]["ratio"] for r in rs], marker="o", **style(arch))
        simple = [r for r in rs if r["payload"]["kind"] == "simplenorm"]
        if simple:
            axes[2].plot(range(len(simple)), [r["payload"]["c_over_gn"] for r in simple], marker="o", **style(arch))
    if groups:
        axes[0].plot([lo, hi], [lo, hi], color="gray", linewidth=1, label="bound = measured")
    axes[0].set(xscale="log", yscale="log", xlabel="measured $\\|H_{xx}\\|$", ylabel="bound",
                title="bound against measurement (every layer)")
    axes[1].set(yscale="log", ylabel="bound / measured", xlabel="block linear map (model order; names differ by arch)",
                title="tightness per layer (>= 1: the bound holds)")
    axes[1].axhline(1.0, color="gray", linewidth=1)
    axes[2].set(yscale="log", ylabel="$\\|C\\| / \\|GN\\|$", xlabel="SimpleNorm layer (model order)",
                title="curvature term against Gauss-Newton")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return save(fig, out, name)


def lr_sweep(sweep_record: dict, curves: dict, thresholds: dict, out, name: str = "lr_sweep") -> list[Path]:
    """(d) loss curves of the lr sweep (one panel per architecture) and, per architecture, the largest stable
    lr beside 2 / lambda_max and Adam's 38 / (preconditioned sharpness).

    sweep_record: models.lr_sweep's record; curves: {(arch, lr): [(step, loss)]}; thresholds:
    {arch: {"gd": 2 / lambda_max or None, "adam": 38 / sharpness or None}}.
    """
    archs = list(sweep_record["archs"])
    ncols = min(3, len(archs) + 1)
    nrows = math.ceil((len(archs) + 1) / ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(archs) + 1:]:
        ax.set_visible(False)
    axes = axes[: len(archs) + 1]
    for ax, arch in zip(axes, archs):
        entry = sweep_record["archs"][arch]
        cmap = plt.get_cmap("viridis", max(2, len(entry["runs"])))
        for k, run in enumerate(entry["runs"]):
            points = curves.get((arch, run["lr"]), [])
            if points:
                steps, losses = zip(*points)
                ax.plot(steps, losses, color=cmap(k), linestyle="-" if run["stable"] else ":",
                        label=f"lr {run['lr']:g}" + ("" if run["stable"] else f" ({run['status']}, unstable)"))
        ax.set(title=arch, xlabel="step", ylabel="training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    ax = axes[-1]
    width = 0.27
    for i, arch in enumerate(archs):
        best = sweep_record["archs"][arch]["largest_stable_lr"]
        bars = [(best, "largest stable lr", "black"), (thresholds.get(arch, {}).get("gd"), "2 / $\\lambda_{max}$",
                "tab:gray"), (thresholds.get(arch, {}).get("adam"), "38 / Adam sharpness", "tab:olive")]
        for k, (value, label, color) in enumerate(bars):
            if value:
                ax.bar(i + (k - 1) * width, value, width, color=color, label=label if i == 0 else None,
                       edgecolor=COLORS.get(arch, "black"), linewidth=2)
        if best and sweep_record["archs"][arch].get("at_edge"):
            ax.annotate("+", (i - width, best), fontsize=9, ha="center", va="bottom")
    ax.set_xticks(range(len(archs)), archs, rotation=30, fontsize=8)
    ax.set(yscale="log", ylabel="learning rate", title="stable lr (+: the largest tried) and thresholds")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return save(fig, out, name)


def densities(records, out, name: str = "density") -> list[Path]:
    """(e) SLQ eigenvalue densities of the parameter-space Hessian at each run's last checkpoint (same grid
    and width for every run, as the sweep settings fix them)."""
    chosen = last_step(ok(records, "params.density"))
    fig, ax = plt.subplots(figsize=(7, 4))
    for (arch, _), rs in by_run(chosen).items():
        payload = rs[-1]["payload"]
        floor = 1e-12
        ax.plot(payload["grid"], [max(d, floor) for d in payload["density"]],
                **{**style(arch), "label": f"{arch} (step {rs[-1]['provenance']['step']})"})
    if chosen:
        width = chosen[0]["payload"]["width"]
        ax.set_title(f"Hessian eigenvalue density (SLQ, Gaussian width {width:g})")
    ax.set(yscale="log", xlabel="eigenvalue", ylabel="density", ylim=(1e-8, None))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, out, name)


def activation_rms(metrics: dict, out, name: str = "activation_rms") -> list[Path]:
    """(f) RMS of the residual stream after each block over training, a panel per layer index;
    metrics: {arch: metrics.jsonl lines} (act_rms keyed by block name, e.g. layers.0 or transformer.h.0)."""
    layer = lambda block: int(block.rsplit(".", 1)[-1])  # noqa: E731
    layers = sorted({layer(b) for lines in metrics.values() for m in lines for b in m.get("act_rms", {})})
    fig, axes = plt.subplots(1, max(1, len(layers)), figsize=(4.5 * max(1, len(layers)), 3.6), squeeze=False)
    for ax, i in zip(axes[0], layers):
        for arch, lines in metrics.items():
            points = [(m["step"], v) for m in lines for b, v in m.get("act_rms", {}).items() if layer(b) == i]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, **style(arch))
        ax.set(title=f"layer {i} output (residual stream)", xlabel="training step", yscale="log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("activation RMS")
    axes[0][0].legend(fontsize=7)
    return save(fig, out, name)
