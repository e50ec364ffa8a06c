"""The engine benchmark: our HVPs and estimators against the gradient and against PyHessian 0.1, in one run.

On one model and one batch (random init, held-out batch of the embedded corpus, float32, the machine's torch
threads), it measures:
(a) HVP time / gradient time for each mode, on simplegpt, llama2 and gpt2 of the same shape. The gradient is
    torch.autograd.grad of the mean loss (math attention path, as for the HVPs). "first" = the first product
    (builds the gradient graph); "HVP" = a later product, the cost of one Lanczos step (the graph is
    kept; fwd-rev keeps none). Times of (a) and (d) are the best of several repeats.
(b) time and HVPs until the dominant eigenvalue (largest |lambda|, what power iteration finds) is within 1e-3
    (relative) of a float64 Lanczos reference with tol 1e-8: our Lanczos stops on its certified residual bound
    (tol 1e-3, so it cannot know it is closer); PyHessian's power iteration runs 100 iterations and is credited
    with its first iterate within 1e-3 (an oracle stop, in its favour); its own stop (tol 1e-3 on the change
    of the estimate) is read off the same iterates.
(c) trace: PyHessian's trace() with its defaults, and with a fixed number of probes; our Hutchinson until the
    latter's standard error, Hutch++ with the same HVP budget; our SLQ density (PyHessian's density() fails
    on current torch: its error is reported).
(d) (not --quick) a GPT-2-small-shaped model: one gradient and one HVP.
Times include building each operator (and PyHessian's set-up), not our self-check guard (2 HVPs + 2 gradients).
"""

from __future__ import annotations

import copy
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SECTION = "engine-bench"
ACCURACY = 1e-3
SHAPES = {  # vocab 103 = the embedded corpus's characters
    "full": dict(dim=128, n_layers=4, n_heads=4, seq_len=128, batch=16, vocab=103, repeats=5, slq=(2, 30),
                 trace_samples=30),
    "quick": dict(dim=32, n_layers=1, n_heads=2, seq_len=16, batch=4, vocab=103, repeats=1, slq=(2, 8),
                  trace_samples=10),
}
GPT2_SMALL = dict(arch="gpt2", vocab_size=50304, dim=768, n_layers=12, n_heads=12, seq_len=1024)
GPT2_SMALL_BATCH = (1, 32)
ARCHS = ("simplegpt", "llama2", "gpt2")


def make_model(arch: str, shape: dict, seed: int = 0) -> nn.Module:
    from models.config import GPTConfig
    from models.gpt import build_model

    torch.manual_seed(seed)
    cfg = GPTConfig(arch=arch, vocab_size=shape["vocab"], dim=shape["dim"], n_layers=shape["n_layers"],
                    n_heads=shape["n_heads"], seq_len=shape["seq_len"], norm_backend="torch")
    return build_model(cfg).eval()


def make_batch(shape: dict, seed: int = 0):
    from models.data import DataSpec, measurement_batches

    return measurement_batches(DataSpec(), 1, shape["batch"], shape["seq_len"], seed)[0]


def _best_time(fn, repeats: int) -> float:
    """The fastest of `repeats` calls: on a shared machine the least disturbed one (as timeit advises)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def grad_time(model: nn.Module, batch, repeats: int) -> float:
    """Seconds of one gradient of the mean loss (best of `repeats` after a warm-up), math attention path."""
    from models.gpt import math_attention, next_token_loss

    model = copy.deepcopy(model).requires_grad_(True)
    params = list(model.parameters())

    def grad():
        with math_attention():
            torch.autograd.grad(next_token_loss(model, batch), params)

    grad()
    return _best_time(grad, repeats)


def hvp_times(model: nn.Module, batch, repeats: int) -> dict:
    """(a) for one model: gradient time and, per mode, first / best later product and their ratios to it."""
    from hessian_tools.operators import MODES, ParamHessian

    g = grad_time(model, batch, repeats)
    out = {"n_params": sum(p.numel() for p in model.parameters()), "grad_s": g, "modes": {}}
    for mode in MODES:
        op = ParamHessian(model, [batch], dtype=torch.float32, mode=mode)
        v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        first = _best_time(lambda: op.matvec(v), 1)
        hvp = _best_time(lambda: op.matvec(v), repeats)
        out["modes"][mode] = {"first_s": first, "hvp_s": hvp, "ratio": hvp / g, "first_ratio": first / g}
    out["best_mode"] = min(out["modes"], key=lambda m: out["modes"][m]["hvp_s"])
    return out


class FlatLogits(nn.Module):
    """PyHessian's view of a GPT: model(idx) -> (B*T, V) logits, on the math attention path."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx):
        from models.gpt import math_attention

        with math_attention():
            return self.model(idx).flatten(0, 1)


def pyhessian_run(model: nn.Module, batch, method: str, **kwargs) -> tuple[object, list, float, float]:
    """(result of hessian(...).method(**kwargs), [(seconds since start, v.Hv) per HVP], total s, set-up s).

    PyHessian's HVPs are observed by wrapping pyhessian.hessian.hessian_vector_product (v.Hv is the power
    iteration's Rayleigh quotient, resp. the Hutchinson sample, PyHessian computes from the same product).
    """
    from pyhessian import hessian
    from pyhessian.utils import group_product

    module = sys.modules["pyhessian.hessian"]
    original = module.hessian_vector_product
    trace: list = []
    wrapper = FlatLogits(copy.deepcopy(model).requires_grad_(True))
    x, y = batch[0], batch[1].flatten()
    start = time.perf_counter()

    def counted(grads, params, v):
        hv = original(grads, params, v)
        trace.append((time.perf_counter() - start, float(group_product(hv, v))))
        return hv

    module.hessian_vector_product = counted
    try:
        with warnings.catch_warnings():  # PyHessian's loss.backward(create_graph=True) warns of a cycle
            warnings.filterwarnings("ignore", message="Using backward")
            comp = hessian(wrapper, F.cross_entropy, data=(x, y), cuda=False)
        setup = time.perf_counter() - start
        result = getattr(comp, method)(**kwargs)
    finally:
        module.hessian_vector_product = original
    return result, trace, time.perf_counter() - start, setup


def top_eigenvalue(model: nn.Module, batch, mode: str) -> dict:
    """(b) on the dominant eigenvalue (largest |lambda|: what power iteration, hence PyHessian, converges to).

    Reference: float64 Lanczos (magnitude, tol 1e-8); ours: Lanczos which="magnitude"; PyHessian's power
    iteration. Speedups in time and HVPs.
    """
    from hessian_tools.estimators import lanczos
    from hessian_tools.operators import ParamHessian

    start = time.perf_counter()
    ref = lanczos(ParamHessian(model, [batch], dtype=torch.float64, mode=mode), which="magnitude", tol=1e-8,
                  max_iter=400)
    lam = ref.value
    reference = {"dominant": lam, "error": ref.error, "converged": ref.converged, "hvps": ref.hvp_count,
                 "seconds": time.perf_counter() - start,
                 "lambda_max_lower_bound": ref.payload["lambda_max_lower_bound"],
                 "lambda_min_upper_bound": ref.payload["lambda_min_upper_bound"]}
    start = time.perf_counter()
    est = lanczos(ParamHessian(model, [batch], dtype=torch.float32, mode=mode), which="magnitude", tol=ACCURACY)
    ours = {"value": est.value, "rel_error": abs(est.value - lam) / abs(lam), "hvps": est.hvp_count,
            "seconds": time.perf_counter() - start, "converged": est.converged, "mode": mode}
    torch.manual_seed(0)  # PyHessian's start vector comes from the global generator
    # tol -inf: PyHessian runs all maxIter iterations; its own stop (tol 1e-3) is read off the same iterates
    _, trace, total, setup = pyhessian_run(model, batch, "eigenvalues", maxIter=100, tol=float("-inf"))
    estimates = [q for _, q in trace]
    stop = next((i for i in range(1, len(estimates)) if abs(estimates[i - 1] - estimates[i])
                 / (abs(estimates[i - 1]) + 1e-6) < ACCURACY), len(estimates) - 1)
    hit = next((i for i, q in enumerate(estimates) if abs(q - lam) <= ACCURACY * abs(lam)), None)
    py = {"value": estimates[stop], "rel_error": abs(estimates[stop] - lam) / abs(lam), "hvps": stop + 1,
          "seconds": trace[stop][0], "setup_s": setup, "reached": hit is not None,
          "hvps_to_accuracy": None if hit is None else hit + 1,
          "seconds_to_accuracy": None if hit is None else trace[hit][0],
          "final_rel_error": abs(estimates[-1] - lam) / abs(lam)}
    py["default_stop_meets_accuracy"] = py["rel_error"] <= ACCURACY
    # not within 1e-3 in 100 iterations: its 100 iterations bound its time below (speedup >= ratio)
    py_s, py_hvps = (py["seconds_to_accuracy"], py["hvps_to_accuracy"]) if hit is not None else (total, len(trace))
    return {"reference": reference, "ours": ours, "pyhessian": py, "speedup": py_s / ours["seconds"],
            "hvp_ratio": py_hvps / ours["hvps"], "speedup_is_lower_bound": hit is None}


def trace_and_density(model: nn.Module, batch, mode: str, slq: tuple[int, int], samples: int) -> dict:
    """(c): PyHessian trace() with its defaults, and with `samples` probes (its stopping test off); our
    Hutchinson until the standard error of the latter; Hutch++ with the same HVP budget; our SLQ density."""
    from hessian_tools.estimators import hutchinson_trace, hutchpp_trace, slq_density
    from hessian_tools.operators import ParamHessian

    def pyhessian_trace(**kwargs):
        values, _, seconds, setup = pyhessian_run(model, batch, "trace", **kwargs)
        return {"value": statistics.fmean(values), "std_error": statistics.stdev(values) / math.sqrt(len(values)),
                "hvps": len(values), "seconds": seconds, "setup_s": setup}

    default = pyhessian_trace()
    py = pyhessian_trace(maxIter=samples, tol=float("-inf"))  # tol -inf: its stopping test never fires

    def timed(estimator):
        start = time.perf_counter()
        est = estimator(ParamHessian(model, [batch], dtype=torch.float32, mode=mode))
        return est, time.perf_counter() - start

    est, seconds = timed(lambda op: hutchinson_trace(op, n_samples=samples, target_std_error=py["std_error"]))
    ours = {"value": est.value, "std_error": est.error, "hvps": est.hvp_count, "seconds": seconds,
            "reached_target": est.converged, "mode": mode}
    pp, pp_seconds = timed(lambda op: hutchpp_trace(op, n_matvecs=max(6, 3 * math.ceil(samples / 3))))
    hutchpp = {"value": pp.value, "std_error": pp.error, "hvps": pp.hvp_count, "seconds": pp_seconds}
    density, slq_seconds = timed(lambda op: slq_density(op, n_probes=slq[0], n_iter=slq[1]))
    n = density.payload["n"]
    ours_slq = {"probes": slq[0], "iter": slq[1], "hvps": density.hvp_count, "seconds": slq_seconds,
                "trace": n * density.value, "trace_std_error": n * density.error}
    # PyHessian's time to Hutch++'s standard error, extrapolated (error ~ 1/sqrt(probes)), over Hutch++'s time
    hutchpp["equivalent_speedup"] = py["seconds"] * (py["std_error"] / pp.error) ** 2 / pp_seconds
    return {"pyhessian_default": default, "pyhessian": py, "ours": ours, "hutchpp": hutchpp,
            "speedup": py["seconds"] / seconds, "slq": ours_slq,
            "pyhessian_density": pyhessian_density_status(model, batch)}


def pyhessian_density_status(model: nn.Module, batch) -> str:
    """What PyHessian's density() does here: 'works' or its exception (3 Lanczos steps, so it fails fast)."""
    try:
        pyhessian_run(model, batch, "density", iter=3, n_v=1)
    except Exception as exc:  # report whatever it raises
        return f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return "works"


def gpt2_small(mode: str, repeats: int = 2) -> dict:
    """(d): one gradient and one HVP (first and later product) of a 124M-parameter GPT-2 shape."""
    from hessian_tools.operators import ParamHessian
    from models.config import GPTConfig
    from models.gpt import build_model

    torch.manual_seed(0)
    model = build_model(GPTConfig(**GPT2_SMALL, norm_backend="torch")).eval()
    b, t = GPT2_SMALL_BATCH
    idx = torch.randint(0, GPT2_SMALL["vocab_size"], (b, t + 1), generator=torch.Generator().manual_seed(0))
    batch = (idx[:, :-1], idx[:, 1:])
    g = grad_time(model, batch, repeats)
    op = ParamHessian(model, [batch], dtype=torch.float32, mode=mode)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    first = _best_time(lambda: op.matvec(v), 1)
    hvp = _best_time(lambda: op.matvec(v), repeats)
    return {"n_params": op.shape[0], "batch": [b, t], "mode": mode, "grad_s": g, "first_s": first, "hvp_s": hvp,
            "ratio": hvp / g}


def machine() -> dict:
    return {"cpu": platform.machine(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "load_average": list(os.getloadavg())}


def run_bench(quick: bool = False, progress=None) -> dict:
    """The whole benchmark as one JSON-able dict; `progress(str)` hears which part runs."""
    say = progress or (lambda line: None)
    shape = SHAPES["quick" if quick else "full"]
    described = ("dim", "n_layers", "n_heads", "seq_len", "batch", "vocab")
    result = {"quick": quick, "shape": {k: shape[k] for k in described},
              "machine_start": machine(), "hvp_vs_grad": {}}
    batch = make_batch(shape)
    for arch in ARCHS:
        say(f"(a) HVP / gradient, {arch}")
        result["hvp_vs_grad"][arch] = hvp_times(make_model(arch, shape), batch, shape["repeats"])
    model = make_model("simplegpt", shape)
    mode = result["hvp_vs_grad"]["simplegpt"]["best_mode"]
    say("(b) top eigenvalue: reference, lanczos, PyHessian")
    result["top_eigenvalue"] = top_eigenvalue(model, batch, mode)
    say("(c) trace and density: PyHessian, Hutchinson, Hutch++, SLQ")
    result["trace"] = trace_and_density(model, batch, mode, shape["slq"], shape["trace_samples"])
    if not quick:
        say("(d) GPT-2 small shape: one gradient, one HVP")
        result["gpt2_small"] = gpt2_small(result["hvp_vs_grad"]["gpt2"]["best_mode"])
    result["machine_end"] = machine()
    result["ratios"] = ratios(result)
    return result


def ratios(result: dict) -> dict:
    """Every ratio of the run, flat: hvp_over_grad/<arch>/<mode>, eigenvalue speedups, trace speedup."""
    out = {f"hvp_over_grad/{arch}/{mode}": m["ratio"]
           for arch, a in result["hvp_vs_grad"].items() for mode, m in a["modes"].items()}
    out["eigenvalue_speedup_vs_pyhessian"] = result["top_eigenvalue"]["speedup"]
    out["eigenvalue_hvp_ratio_vs_pyhessian"] = result["top_eigenvalue"]["hvp_ratio"]
    out["trace_speedup_vs_pyhessian"] = result["trace"]["speedup"]
    out["trace_hutchpp_equivalent_speedup_vs_pyhessian"] = result["trace"]["hutchpp"]["equivalent_speedup"]
    if "gpt2_small" in result:
        out["hvp_over_grad/gpt2_small"] = result["gpt2_small"]["ratio"]
    return out


def _s(x) -> str:
    return "n/a" if x is None else f"{x:.3g} s"


def markdown(result: dict) -> str:
    """The BENCHMARKS.md section (between the engine-bench markers)."""
    s, m0, m1 = result["shape"], result["machine_start"], result["machine_end"]
    loaded = max(m0["load_average"][0], m1["load_average"][0]) > m0["cores"]
    busy = ": above the core count, other processes shared the CPUs" if loaded else ""
    lines = ["## Hessian engine", "",
             f"`hessian-tools bench`{' --quick' if result['quick'] else ''} ({m0['cpu']}, {m0['cores']} cores, "
             f"{m0['threads']} threads, torch {m0['torch']}; 1-minute load average {m0['load_average'][0]:.1f} at "
             f"the start, {m1['load_average'][0]:.1f} at the end{busy}). Shape: dim {s['dim']}, {s['n_layers']} layers, {s['n_heads']} heads, vocab {s['vocab']}, "
             f"batch {s['batch']} x {s['seq_len']}; random init, float32. See `hessian_tools/bench.py` for the "
             "exact protocol.", "",
             "### (a) HVP time / gradient time (goal <= 2.5)", "",
             "| model | params | gradient | mode | first product | HVP (graph kept) | HVP / gradient |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for arch, a in result["hvp_vs_grad"].items():
        for mode, m in a["modes"].items():
            best = " (fastest)" if mode == a["best_mode"] else ""
            lines.append(f"| {arch} | {a['n_params']:,} | {_s(a['grad_s'])} | {mode}{best} | {_s(m['first_s'])} | "
                         f"{_s(m['hvp_s'])} | {m['ratio']:.2f} |")
    e = result["top_eigenvalue"]
    ref, ours, py = e["reference"], e["ours"], e["pyhessian"]
    bound = ">= " if e["speedup_is_lower_bound"] else ""
    lines += ["", f"### (b) dominant eigenvalue to {ACCURACY:g} relative accuracy (goal: >= 3x faster than PyHessian)",
              "", "The dominant eigenvalue (largest |lambda|) is what power iteration, hence PyHessian's "
              "`eigenvalues()`, converges to; at random init it can be lambda_min. Reference: float64 Lanczos, "
              f"dominant eigenvalue {ref['dominant']:.8g} +- {ref['error']:.1g} ({ref['hvps']} HVPs, "
              f"{_s(ref['seconds'])}; lambda_max >= {ref['lambda_max_lower_bound']:.6g}, lambda_min <= "
              f"{ref['lambda_min_upper_bound']:.6g}).", "",
              "| method | HVPs | time | estimate | relative error |", "|---|---:|---:|---:|---:|",
              f"| ours: Lanczos (magnitude), stops on certified residual <= {ACCURACY:g} ({ours['mode']}) | "
              f"{ours['hvps']} | {_s(ours['seconds'])} | {ours['value']:.8g} | {ours['rel_error']:.1e} |",
              f"| PyHessian power iteration, first iterate within {ACCURACY:g} (oracle stop) | "
              f"{py['hvps_to_accuracy'] or 'not in 100'} | {_s(py['seconds_to_accuracy'])} | | |",
              f"| PyHessian power iteration, its own stop (tol {ACCURACY:g}, maxIter 100) | {py['hvps']} | "
              f"{_s(py['seconds'])} | {py['value']:.8g} | {py['rel_error']:.1e} |", "",
              f"Speedup: **{bound}{e['speedup']:.1f}x** in time, {bound}{e['hvp_ratio']:.1f}x in HVPs"
              f"{' (PyHessian was not within it after 100 iterations: their time is the bound)' if bound else ''}."]
    t = result["trace"]
    td, tp, to, pp, sl = t["pyhessian_default"], t["pyhessian"], t["ours"], t["hutchpp"], t["slq"]
    row = lambda name, r: (f"| {name} | {r['hvps']} | {_s(r['seconds'])} | {r['value']:.6g} | "  # noqa: E731
                           f"{r['std_error']:.3g} |")
    lines += ["", "### (c) trace at a matched standard error, and the spectral density", "",
              "| method | HVPs | time | trace | standard error |", "|---|---:|---:|---:|---:|",
              row("PyHessian trace(), its defaults (tol 1e-3, maxIter 100)", td),
              row(f"PyHessian trace(), {tp['hvps']} probes (its stopping test off)", tp),
              row("ours: Hutchinson until that standard error", to),
              row("ours: Hutch++, same HVP budget", pp),
              f"| ours: SLQ density, {sl['probes']} probes x {sl['iter']} steps | {sl['hvps']} | "
              f"{_s(sl['seconds'])} | {sl['trace']:.6g} | {sl['trace_std_error']:.3g} |", "",
              f"Trace speedup at a matched standard error (Hutchinson vs PyHessian, {tp['hvps']} probes): "
              f"**{t['speedup']:.1f}x**{'' if to['reached_target'] else ' (ours did not reach the target)'}. "
              f"Hutch++ against PyHessian's time to reach Hutch++'s standard error (extrapolated as 1/sqrt(probes)): "
              f"{pp['equivalent_speedup']:.1f}x. "
              f"PyHessian density(): {t['pyhessian_density']}."]
    if "gpt2_small" in result:
        g = result["gpt2_small"]
        lines += ["", "### (d) GPT-2-small shape", "",
                  f"{g['n_params']:,} parameters, batch {g['batch'][0]} x {g['batch'][1]}, {m0['threads']} threads: "
                  f"gradient {_s(g['grad_s'])}, first HVP {_s(g['first_s'])}, later HVP {_s(g['hvp_s'])} "
                  f"({g['mode']}; HVP / gradient {g['ratio']:.2f})."]
    return "\n".join(lines)
