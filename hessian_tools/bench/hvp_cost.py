"""HVP cost against the gradient, per mode and variant: time, matrix-multiply flops and memory, side by side.

For each variant at the bench shape (random init, one held-out batch, float32): the gradient (torch.autograd.grad
of the mean loss, math attention path), and per mode a product on a kept graph (the cost of a Lanczos step),
a fresh product (keep_graph=False: builds and frees its graph; what every product of a budget-limited
operator costs) and the first product of a new operator (graph build and memory metering included: what
auto mode's first product costs). Times are the fastest of `repeats` turns (bench/common.py).
Flops: torch.utils.flop_counter counts matrix multiplies (mm, bmm, attention); the ratio to the gradient's is
set beside the lower bound of `operators/hvp.py` (2 kept, 8/3 fresh; autograd's fresh products compute the
gradient's values too, 3). Memory: the operator's `memory()` (peak of the first product, kept graph).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from hessian_tools.bench.common import ARCHS, best_times, gradient_fn, make_batch, make_model, timed

LOWER_BOUND = {"kept": 2.0, "fresh": 8.0 / 3.0}
GOAL = {"kept": 2.0, "fresh": 2.5}


def matmul_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def variant_cost(model, batch, repeats: int, space: dict | None = None) -> dict:
    """One variant: gradient, and per mode kept / fresh / first products (seconds, ratios, flops, memory).

    space: None for all parameters, or {"site": NAME} for the activation at a site."""
    from hessian_tools.operators import MODES, ActivationHessian, ParamHessian
    from hessian_tools.operators.memory import MemoryMeter

    def make(mode, keep):
        if space is None:
            return ParamHessian(model, [batch], dtype=torch.float32, mode=mode, keep_graph=keep)
        return ActivationHessian(model, [batch], space["site"], dtype=torch.float32, mode=mode, keep_graph=keep)

    grad = gradient_fn(model, batch)
    grad()
    ops, first = {}, {}
    for mode in MODES:
        ops[mode] = (make(mode, True), make(mode, False))
        v = torch.randn(ops[mode][0].shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        first[mode] = timed(lambda: ops[mode][0].matvec(v))[1]  # builds the graph, memory metered
        ops[mode][1].matvec(v)
    unmetered = make("double-backward", False)
    vv = unmetered._cast(v, 1)
    unmetered._matvec(vv)

    def metered():
        with MemoryMeter("cpu"):
            unmetered._matvec(vv)

    fns = {"grad": grad, "meter/off": lambda: unmetered._matvec(vv), "meter/on": metered}
    for mode, (kept, fresh) in ops.items():
        fns[f"kept/{mode}"] = lambda op=kept: op.matvec(v)
        fns[f"fresh/{mode}"] = lambda op=fresh: op.matvec(v)
    t = best_times(fns, repeats)
    g = t["grad"]
    grad_flops = matmul_flops(grad)
    out = {"n": ops["double-backward"][0].shape[0], "grad_s": g, "grad_matmul_flops": grad_flops,
           "meter_overhead": t["meter/on"] / t["meter/off"] - 1, "modes": {}}
    for mode, (kept, fresh) in ops.items():
        out["modes"][mode] = {
            "kept_s": t[f"kept/{mode}"], "fresh_s": t[f"fresh/{mode}"], "first_s": first[mode],
            "kept_ratio": t[f"kept/{mode}"] / g, "fresh_ratio": t[f"fresh/{mode}"] / g, "first_ratio": first[mode] / g,
            "kept_flop_ratio": matmul_flops(lambda op=kept: op.matvec(v)) / grad_flops,
            "fresh_flop_ratio": matmul_flops(lambda op=fresh: op.matvec(v)) / grad_flops,
            "peak_bytes": kept.memory()["measured_peak_bytes"], "kept_graph_bytes": kept.memory()["kept_graphs_bytes"],
            "fresh_peak_bytes": fresh.memory()["measured_peak_bytes"],
        }
    for what in ("kept", "fresh"):
        out[f"fastest_{what}"] = min(out["modes"], key=lambda m: out["modes"][m][f"{what}_s"])
    return out


def run(shape: dict, say=print) -> dict:
    """Every variant in parameter space, and simplegpt at an activation site (the auto rule's evidence there)."""
    from hessian_tools.operators.hvp import AUTO_MODE

    batch = make_batch(shape)
    result = {"auto_mode": AUTO_MODE, "lower_bound": LOWER_BOUND, "goal": GOAL, "params": {}}
    for arch in ARCHS:
        say(f"HVP cost: {arch}")
        result["params"][arch] = variant_cost(make_model(arch, shape), batch, shape["repeats"])
    site = f"layers.{shape['n_layers'] - 1}.feed_forward:in"
    say(f"HVP cost: simplegpt activation {site}")
    result["activation"] = {"arch": "simplegpt", "site": site,
                            **variant_cost(make_model("simplegpt", shape), batch, shape["repeats"], {"site": site})}
    return result
