"""The numbers of an experiment, per architecture with their spread over seeds, and what they say about the
paper's claims: the demo's table and the numbers section of figures/README.md, both from one `summarize`.

Every value is taken at each run's last checkpoint and reported as mean [min, max] over the training seeds.
Comparisons (`verdict`) between a SimpleNorm model and its baseline (simplegpt against llama2 and
llama2_qknorm, simplegpt_gpt2 against gpt2) use a range per architecture: for measures with a data interval
(the jackknife for parameter-space measures, the per-batch t interval for activation sites) the hull of the
seeds' 68 % intervals, otherwise the hull of the seeds' values with their solver intervals. The claim is
"supported" when the SimpleNorm model's range lies entirely on the claimed side of the baseline's,
"contradicted" when entirely on the other side, and "cannot settle" when the ranges overlap. Stable lrs: the
ranges are the per-seed thresholds (models.lr_sweep). Gauss-Newton dominance: ||C|| / ||GN|| < 1 on every
SimpleNorm layer of every seed supports it, > 1 on most contradicts it, anything else cannot settle it.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

from hessian_tools.benchmarks_md import write_section
from models.config import SITE_ROLES as ROLES

PAIRS = (("simplegpt", "llama2"), ("simplegpt", "llama2_qknorm"), ("simplegpt_gpt2", "gpt2"))
COMPARABLE = {"layer.lambda_max": "layer-scaled lambda_max", "elementwise.lambda_max": "elementwise-scaled lambda_max",
              "adam.sharpness": "Adam's preconditioned sharpness"}
SECTION = "numbers"


# ---- reading records -------------------------------------------------------------------------------------------


def _ok(records, measure):
    return [r for r in records if r.get("status") == "ok" and r["provenance"].get("measure") == measure]


def last_records(records, measure) -> list[dict]:
    """The records of `measure` at each run's last checkpoint (the last step measured for that run)."""
    chosen = _ok(records, measure)
    last = {}
    for r in records:
        if r.get("status") == "ok":
            run = r["provenance"]["run_dir"]
            last[run] = max(last.get(run, -1), r["provenance"]["step"])
    return [r for r in chosen if r["provenance"]["step"] == last[r["provenance"]["run_dir"]]]


def solver_interval(record) -> list[float]:
    """The record's interval (payload["interval"]), or value +- error."""
    interval = (record.get("payload") or {}).get("interval")
    if interval:
        return list(interval)
    err = record.get("error") or 0.0
    return [record["value"] - err, record["value"] + err]


def data_error(record) -> dict | None:
    """payload["data_error"] when it was measured and is ok."""
    d = (record.get("payload") or {}).get("data_error")
    return d if d and d.get("status") == "ok" else None


def spread(values) -> dict | None:
    """{"mean", "min", "max", "n"} of the values that exist (None if none)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}


def _by_seed(records) -> dict:
    return {r["provenance"].get("train_seed"): r for r in records}


def measure_summary(records, measure, arch) -> dict | None:
    """Per seed value, solver interval, data interval; the spread of values and the comparison range."""
    rows = [r for r in last_records(records, measure) if r["provenance"]["arch"] == arch]
    if not rows:
        return None
    seeds = {}
    for seed, r in sorted(_by_seed(rows).items(), key=lambda kv: (kv[0] is None, kv[0])):
        d = data_error(r)
        seeds[seed] = {"value": r["value"], "interval": solver_interval(r), "error_kind": r["error_kind"],
                       "data_value": d["value"] if d else None, "data_interval": d["interval"] if d else None,
                       "data_method": d["method"] if d else None, "warning": d.get("warning") if d else None}
    with_data = all(s["data_interval"] for s in seeds.values())
    ranges = [s["data_interval"] if with_data else s["interval"] for s in seeds.values()]
    return {"seeds": seeds, "value": spread(s["value"] for s in seeds.values()),
            "data_value": spread(s["data_value"] for s in seeds.values()),
            "range": [min(r[0] for r in ranges), max(r[1] for r in ranges)], "range_from": "data" if with_data else
            "solver"}


def site_summaries(records, measure, arch) -> dict:
    """{(role, layer, site): measure_summary} over the activation sites of `arch`."""
    rows = [r for r in last_records(records, measure) if r["provenance"]["arch"] == arch]
    keys = sorted({(r["provenance"].get("site_role") or "", r["provenance"].get("layer") or 0,
                    r["provenance"]["site"]) for r in rows}, key=lambda k: (k[1], k[2]))
    out = {}
    for role, layer, site in keys:
        chosen = [r for r in rows if r["provenance"]["site"] == site]
        out[(role, layer, site)] = measure_summary(chosen, measure, arch)
    return out


def bound_summary(records, arch) -> dict | None:
    rows = [r for r in last_records(records, "bound.hxx") if r["provenance"]["arch"] == arch]
    if not rows:
        return None
    ratios = [r["payload"]["ratio"] for r in rows if r["payload"].get("ratio")]
    simple = [r["payload"]["c_over_gn"] for r in rows if r["payload"].get("kind") == "simplenorm"]
    seeds = {r["provenance"].get("train_seed") for r in rows}
    return {"layers": len(rows), "seeds": len(seeds), "tightness": [min(ratios), max(ratios)] if ratios else None,
            "violated": sum(bool(r["payload"].get("violated")) for r in rows),
            "c_over_gn": [min(simple), max(simple)] if simple else None,
            "gn_dominant": sum(c < 1 for c in simple), "simplenorm_layers": len(simple)}


def sample_size_summary(records, arch) -> dict | None:
    rows = [r for r in last_records(records, "params.sample_size_curve") if r["provenance"]["arch"] == arch]
    if not rows:
        return None
    points = [{p["n_batches"]: p["value"] for p in r["payload"]["points"]} for r in rows]
    sizes = sorted(set.intersection(*(set(p) for p in points)))
    return {n: spread(p[n] for p in points) for n in sizes}


# ---- the summary -----------------------------------------------------------------------------------------------


def summarize(results) -> dict:
    """Everything the table and the README section print (module docstring), from a results_bundle.Results."""
    records, lr = results.records, results.lr_sweep
    archs = [a for a in results.experiment.get("archs", []) or sorted({r["provenance"]["arch"] for r in records})]
    per_arch = {}
    for arch in archs:
        losses = [v for (a, _), v in sorted(results.final_losses.items()) if a == arch]
        entry = {"final_loss": spread(losses), "final_loss_seeds": losses}
        for measure in ("params.lambda_max", *COMPARABLE):
            entry[measure] = measure_summary(records, measure, arch)
        lam = entry["params.lambda_max"]
        entry["gd_threshold"] = spread(2 / s["value"] for s in lam["seeds"].values() if s["value"] > 0) if lam else None
        adam = [r for r in last_records(records, "adam.sharpness") if r["provenance"]["arch"] == arch]
        entry["adam_threshold"] = spread(adam_factor(r) / r["value"] for r in adam if r["value"] > 0)
        entry["activation"] = {m: site_summaries(records, m, arch)
                               for m in ("activation.spectral_norm", "activation.scale_free")}
        entry["bound"] = bound_summary(records, arch)
        entry["sample_size"] = sample_size_summary(records, arch)
        stable = (lr.get("archs") or {}).get(arch)
        entry["stable_lr"] = None if stable is None else {
            "all_seeds": stable["largest_stable_lr"], "at_edge": stable["at_edge"], "per_seed": stable["per_seed"]}
        per_arch[arch] = entry
    return {"archs": per_arch, "claims": claims(per_arch), "experiment": results.experiment,
            "lr_sweep": {"lrs": lr.get("lrs"), "seeds": lr.get("seeds"), "criterion": lr.get("criterion")}}


def adam_factor(record) -> float:
    """(2 + 2 beta1) / (1 - beta1): Adam is at its edge of stability when lr x sharpness reaches it."""
    beta1 = record["payload"]["adam"]["beta1"]
    return (2 + 2 * beta1) / (1 - beta1)


def verdict(simple: list[float] | None, base: list[float] | None, lower_is_claimed: bool = True) -> str:
    """"supports", "contradicts" or "cannot settle" for two ranges [lo, hi] (module docstring)."""
    if not simple or not base:
        return "not measured"
    if lower_is_claimed:
        simple, base = base, simple  # the claim: simple below base, i.e. base above simple
    if simple[0] > base[1]:
        return "supports"
    if simple[1] < base[0]:
        return "contradicts"
    return "cannot settle"


def _loss_range(entry):
    s = entry["final_loss"]
    return None if s is None else [s["min"], s["max"]]


def _lr_range(entry):
    values = [v for v in (entry["stable_lr"] or {}).get("per_seed", {}).values()]
    if not values:
        return None
    if None in values:  # a seed stable at no lr tried: below the smallest
        return [0.0, max((v for v in values if v is not None), default=0.0)]
    return [min(values), max(values)]


def claims(per_arch: dict) -> dict:
    """{claim: {"pairs": {"simple vs base": verdict}, ...}} for the claims the module docstring names."""
    out = {"lower loss": {}, "larger stable lr": {}, "GN dominance": {}}
    for measure in COMPARABLE:
        out[f"lower {COMPARABLE[measure]}"] = {}
    out["lower activation curvature (scale-free, role sites)"] = {}
    for simple, base in PAIRS:
        if simple not in per_arch or base not in per_arch:
            continue
        s, b, pair = per_arch[simple], per_arch[base], f"{simple} vs {base}"
        out["lower loss"][pair] = verdict(_loss_range(s), _loss_range(b))
        out["larger stable lr"][pair] = verdict(_lr_range(s), _lr_range(b), lower_is_claimed=False)
        for measure in COMPARABLE:
            out[f"lower {COMPARABLE[measure]}"][pair] = verdict((s[measure] or {}).get("range"),
                                                                (b[measure] or {}).get("range"))
        sites_s, sites_b = s["activation"]["activation.scale_free"], b["activation"]["activation.scale_free"]
        by_role = {(k[0], k[1]): v for k, v in sites_b.items()}
        counts = {}
        for (role, layer, _), summary in sites_s.items():
            other = by_role.get((role, layer))
            if other:
                v = verdict(summary["range"], other["range"])
                counts[v] = counts.get(v, 0) + 1
        out["lower activation curvature (scale-free, role sites)"][pair] = counts or "not measured"
    for arch, entry in per_arch.items():
        bound = entry["bound"]
        if bound and bound["simplenorm_layers"]:
            n, k = bound["simplenorm_layers"], bound["gn_dominant"]
            out["GN dominance"][arch] = ("supports" if k == n else "contradicts" if k < n / 2 else "cannot settle")
    return out


# ---- text ------------------------------------------------------------------------------------------------------


def num(x, fmt: str = ".3g") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def spread_text(s: dict | None, fmt: str = ".3g") -> str:
    """"mean [min, max]" (just the value for one seed)."""
    if s is None:
        return "-"
    if s["n"] == 1:
        return num(s["mean"], fmt)
    return f"{num(s['mean'], fmt)} [{num(s['min'], fmt)}, {num(s['max'], fmt)}]"


def _value(entry, measure, fmt=".3g"):
    m = entry.get(measure)
    return spread_text(m["value"], fmt) if m else "-"


def _lr_text(entry) -> str:
    lr = entry["stable_lr"]
    if lr is None:
        return "-"
    per_seed = ", ".join(num(v) for v in lr["per_seed"].values())
    return f"{num(lr['all_seeds'])}{'+' if lr['at_edge'] else ''} ({per_seed})"


def format_table(summary: dict) -> str:
    """The demo's table: one row per architecture, mean [min, max] over seeds at the last checkpoint."""
    head = ["arch", "loss", "lambda_max", "layer-scaled", "elementwise", "Adam S", "act sf max", "stable lr",
            "2/lam_max", "38/S_adam"]
    rows = []
    for arch, e in summary["archs"].items():
        sites = [s["value"]["max"] for s in e["activation"]["activation.scale_free"].values() if s]
        rows.append([arch, spread_text(e["final_loss"], ".3f"), _value(e, "params.lambda_max"),
                     _value(e, "layer.lambda_max"), _value(e, "elementwise.lambda_max"), _value(e, "adam.sharpness"),
                     num(max(sites)) if sites else "-", _lr_text(e), spread_text(e["gd_threshold"]),
                     spread_text(e["adam_threshold"])])
    widths = [max(len(str(r[i])) for r in [head, *rows]) + 2 for i in range(len(head))]
    lines = ["".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("mean [min, max] over the training seeds, at each run's last checkpoint. lambda_max: raw "
                 "parameter-space Hessian (not comparable across architectures); layer-scaled / elementwise: "
                 "S H S and diag|w| H diag|w|; Adam S: lambda_max(P^-1 H); act sf max: the largest scale-free "
                 "activation norm over the role sites; stable lr: the largest lr stable for every seed (+: the "
                 "largest tried), each seed's in brackets; 2/lam_max, 38/S_adam: the GD and Adam edges of "
                 "stability. Claims: " + "; ".join(f"{c}: {_claim_text(v)}" for c, v in summary["claims"].items()))
    return "\n".join(lines)


def _claim_text(pairs: dict) -> str:
    if not pairs:
        return "not measured"
    return ", ".join(f"{p} {v if isinstance(v, str) else _counts(v)}" for p, v in pairs.items())


def _counts(counts: dict) -> str:
    return "/".join(f"{k} at {n} sites" for k, n in sorted(counts.items()))


def _interval(x) -> str:
    return "-" if not x else f"[{num(x[0])}, {num(x[1])}]"


def markdown(summary: dict) -> str:
    """The numbers section of figures/README.md (between the markers `SECTION`)."""
    exp, archs = summary["experiment"], summary["archs"]
    from models.train_config import OPTIMIZER_DEFAULTS, field_defaults

    train = {**field_defaults(), **exp.get("train", {})}
    train = {**train, **{k: v for k, v in OPTIMIZER_DEFAULTS[train["optimizer"]].items() if train[k] is None}}
    lr, sweep = exp.get("lr_sweep", {}), exp.get("sweep", {})
    seeds = exp.get("seeds", [])
    out = [f"Written by `hessian_tools.findings` from `figures/results/` (scale `{exp.get('scale')}`, version "
           f"{exp.get('version')}); `python -m hessian_tools.findings figures/results figures/README.md` rewrites it.",
           "", "### Run sizes", "",
           f"- Main runs, one per architecture and training seed ({', '.join(map(str, seeds))}): dim {train.get('dim')}, "
           f"{train.get('n_layers')} layers, {train.get('n_heads')} heads, context {train.get('seq_len')}, batch "
           f"{train.get('batch_size')}, {train.get('steps')} AdamW steps (peak lr {num(train.get('lr'))}, "
           f"{train.get('warmup')} warm-up steps, linear decay to 0, clip {num(train.get('grad_clip'))}, weight decay "
           f"{num(train.get('weight_decay'))}); checkpoints at steps {', '.join(map(str, exp.get('checkpoint_steps', [])))}.",
           f"- Learning-rate sweep: the same models and seeds, {lr.get('steps')} steps ({lr.get('warmup')} warm-up), lr in "
           f"{{{', '.join(num(x) for x in lr.get('lrs', []))}}}. {summary['lr_sweep'].get('criterion') or ''}",
           f"- Hessian sweep: {sweep.get('n_batches')} fixed held-out batches of {sweep.get('batch_size')} x "
           f"{train.get('seq_len')} tokens per run, {sweep.get('dtype')} products, Lanczos tolerance "
           f"{num(sweep.get('tol'))}. "
           "Measured: " + "; ".join(_measurement_text(m, exp) for m in exp.get("measurements", [])) + ".",
           "", "### Wall time", "", *_timing_lines(exp.get("timing", {})), "",
           "### Per architecture at the last checkpoint", "",
           "Mean [min, max] over the seeds. lambda_max is the union estimate on all batches (its solver interval "
           "is far below the seed spread); the comparable measures are S H S (layer), diag|w| H diag|w| "
           "(elementwise) and lambda_max(P^-1 H) with Adam's preconditioner; 2 / lambda_max and 38 / S_adam "
           "(beta1 = 0.9) are the learning rates at the edges of stability of GD and Adam.", "",
           "| arch | final loss | lambda_max (raw) | layer-scaled | elementwise | Adam sharpness | stable lr, all "
           "seeds (per seed) | 2 / lambda_max | 38 / S_adam |", "|---|---|---|---|---|---|---|---|---|"]
    for arch, e in archs.items():
        out.append(f"| {arch} | {spread_text(e['final_loss'], '.3f')} | {_value(e, 'params.lambda_max')} | "
                   f"{_value(e, 'layer.lambda_max')} | {_value(e, 'elementwise.lambda_max')} | "
                   f"{_value(e, 'adam.sharpness')} | {_lr_text(e)} | {spread_text(e['gd_threshold'])} | "
                   f"{spread_text(e['adam_threshold'])} |")
    out += ["", "### Data error bars (jackknife over the batch groups, seed by seed)", "",
            "Bias-corrected value and its 68 % interval for the population value (the Hessian of the expected "
            "loss); the union estimate on the same batches beside it.", "",
            "| arch | measure | seed: union -> jackknife [68 % interval] |", "|---|---|---|"]
    for arch, e in archs.items():
        for measure in ("params.lambda_max", "layer.lambda_max"):
            m = e.get(measure)
            if m and any(s["data_interval"] for s in m["seeds"].values()):
                cells = "; ".join(f"{seed}: {num(s['value'])} -> {num(s['data_value'])} {_interval(s['data_interval'])}"
                                  for seed, s in m["seeds"].items())
                out.append(f"| {arch} | {measure} | {cells} |")
    out += ["", "### Sample size: raw lambda_max on the first n batches (mean [min, max] over seeds)", ""]
    for arch, e in archs.items():
        if e["sample_size"]:
            out.append(f"- {arch}: " + ", ".join(f"n = {n}: {spread_text(s)}" for n, s in e["sample_size"].items()))
    out += ["", "### Activation sites (scale-free ms x ||H_b||, mean over batches; mean [min, max] over seeds)", ""]
    roles = sorted({(k[1], k[0]) for e in archs.values() for k in e["activation"]["activation.scale_free"] if k[0]},
                   key=lambda lr: (lr[0], ROLES.index(lr[1]) if lr[1] in ROLES else len(ROLES)))
    if roles:
        out += ["| arch | " + " | ".join(f"{role} {layer}" for layer, role in roles) + " |",
                "|---|" + "---|" * len(roles)]
        for arch, e in archs.items():
            by = {(k[1], k[0]): v for k, v in e["activation"]["activation.scale_free"].items()}
            out.append(f"| {arch} | " + " | ".join(spread_text(by[r]["value"]) if by.get(r) else "-" for r in roles)
                       + " |")
    out += ["", "### The SimpleNorm bound (theory.verify, last checkpoint)", ""]
    for arch, e in archs.items():
        b = e["bound"]
        if b:
            gn = "" if not b["c_over_gn"] else (f"; ||C|| / ||GN|| {_interval(b['c_over_gn'])}, below 1 on "
                                                f"{b['gn_dominant']} of {b['simplenorm_layers']} SimpleNorm layers")
            out.append(f"- {arch}: bound / measured {_interval(b['tightness'])} over {b['layers']} layer rows "
                       f"({b['seeds']} seeds), violated on {b['violated']}{gn}.")
    out += ["", "### The paper's claims at this scale", "",
            "Rule (hessian_tools.findings): supported when the SimpleNorm model's range (the hull over seeds of the "
            "68 % data intervals where measured, else of the values and solver intervals; per-seed thresholds for "
            "the lr) lies entirely on the claimed side of the baseline's, contradicted when entirely on the other, "
            "otherwise it cannot be settled.", ""]
    for claim, pairs in summary["claims"].items():
        out.append(f"- {claim}: {_claim_text(pairs)}.")
    gn = {a: e["bound"] for a, e in summary["archs"].items() if e["bound"] and e["bound"]["simplenorm_layers"]}
    if gn:
        out.append("- GN dominance rests on " + ", ".join(
            f"{a}: {b['simplenorm_layers']} SimpleNorm layer rows of {b['seeds']} seed(s)" for a, b in gn.items())
            + " (the bound section above): a small sample.")
    return "\n".join(out)


def _measurement_text(m: dict, exp: dict) -> str:
    where = {"last": "the last checkpoint", "before_last": "every earlier checkpoint", "all": "every checkpoint"}
    seeds = "every seed" if m.get("seeds") is None else f"the first {m['seeds']} seed(s)"
    groups = f", jackknife over {m['n_groups']} groups" if m.get("n_groups") else ""
    return f"{', '.join(m['what'])} at {where[m['at']]} of {seeds}{groups}"


def _timing_lines(timing: dict) -> list[str]:
    if not timing:
        return ["- not recorded"]
    names = {"demo": "`hessian-tools demo` from an empty directory", "train": "training (main runs and lr sweep)",
             "sweep": "Hessian sweeps"}
    lines = []
    for phase in ("demo", "train", "sweep"):
        t = timing.get(phase)
        if t:
            load = "/".join(num(x, ".2f") for x in t.get("load_average_before") or []) or "-"
            lines.append(f"- {names[phase]}: {num(t['wall_time_s'], '.0f')} s ({t.get('jobs')} processes on "
                         f"{t.get('cores')} cores; load average before {load})")
    return lines


def sections(results) -> dict:
    """{section name: text} of figures/README.md computed from `results`: the numbers, and the edge-of-stability
    section (hessian_tools.eos.findings) where the bundle holds its runs."""
    from hessian_tools import eos

    found = {SECTION: markdown(summarize(results))}
    if results.eos.get("runs"):
        found[eos.SECTION] = eos.findings(results.eos)
    return found


def write_readme(results_dir, readme) -> dict:
    """Rewrite the computed sections of `readme` from the results bundle in `results_dir`; returns them."""
    from hessian_tools.results_bundle import Results

    found = sections(Results.load(results_dir))
    for name, text in found.items():
        write_section(readme, name, text)
    return found


def readme_section(readme, name: str = SECTION) -> str | None:
    """Section `name` as it is in `readme` now (None without its markers)."""
    from hessian_tools.benchmarks_md import markers

    text, (start, end) = Path(readme).read_text(), markers(name)
    if start not in text or end not in text:
        return None
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n")


if __name__ == "__main__":
    write_readme(*sys.argv[1:3])
