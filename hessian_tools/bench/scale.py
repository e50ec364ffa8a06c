"""The GPT-2-small shape (124M parameters) at realistic token counts on this machine: gradient, one HVP per mode
(kept graph and fresh), peak memory per mode, and lambda_max to ACCURACY by Lanczos (HVPs and wall time), its basis
stored in float32 (0.5 GB a vector here) within the memory left beside the kept graph: max_iter is what fits. The
float32 rounding is measured first, on a random unit vector (one float32 and one float64 product, counted), so the
float64 twin's memory is returned before the basis is sized."""

from __future__ import annotations

import ctypes

import torch

from hessian_tools.bench.common import best_times, gradient_fn, timed
from hessian_tools.estimators.guarantees import measured_rounding
from hessian_tools.footprint import available_bytes

GPT2_SMALL = dict(arch="gpt2", vocab_size=50304, dim=768, n_layers=12, n_heads=12, seq_len=256)
TOKENS = (4, 256)  # batch x sequence length
QUICK = dict(arch="gpt2", vocab_size=64, dim=16, n_layers=1, n_heads=2, seq_len=8)
QUICK_TOKENS = (2, 8)
ACCURACY = 1e-3
SPARE_VECTORS = 8  # float64 vectors of n left free beside the float32 basis: the Lanczos vector, its product, casts
MARGIN_BYTES = 3 * 2**30  # what else a step allocates (two runs with 1 GiB and 4 spare vectors ran out of memory)


def _return_freed_memory():
    """Hands glibc's freed heap (the float64 twin's activations, below its mmap threshold) back to the system, so
    the memory available afterwards is what the basis can really take; a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run(quick: bool = False, say=print) -> dict:
    from hessian_tools.estimators import lanczos
    from hessian_tools.operators import MODES, ParamHessian
    from models.config import GPTConfig
    from models.gpt import build_model

    config, (b, t) = (QUICK, QUICK_TOKENS) if quick else (GPT2_SMALL, TOKENS)
    torch.manual_seed(0)
    model = build_model(GPTConfig(**config, norm_backend="torch")).eval()
    idx = torch.randint(0, config["vocab_size"], (b, t + 1), generator=torch.Generator().manual_seed(0))
    batch = (idx[:, :-1], idx[:, 1:])
    grad = gradient_fn(model, batch)
    grad()
    out = {"config": config, "tokens": [b, t], "grad_s": best_times({"g": grad}, 2)["g"], "modes": {}}
    v = None
    for mode in MODES:
        say(f"scale: {mode}")
        kept = ParamHessian(model, [batch], dtype=torch.float32, mode=mode)
        fresh = ParamHessian(model, [batch], dtype=torch.float32, mode=mode, keep_graph=False)
        if v is None:
            v = torch.randn(kept.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        first = timed(lambda: kept.matvec(v))[1]
        t = best_times({"kept": lambda: kept.matvec(v), "fresh": lambda: fresh.matvec(v)}, 1)
        out["modes"][mode] = {"first_s": first, "kept_s": t["kept"], "fresh_s": t["fresh"],
                              "kept_ratio": t["kept"] / out["grad_s"], "fresh_ratio": t["fresh"] / out["grad_s"],
                              "peak_bytes": kept.memory()["measured_peak_bytes"],
                              "kept_graph_bytes": kept.memory()["kept_graphs_bytes"],
                              "fresh_peak_bytes": fresh.memory()["measured_peak_bytes"]}
        del kept, fresh
    out["n_params"] = n = int(v.numel())
    say("scale: lambda_max")
    op = ParamHessian(model, [batch], dtype=torch.float32)
    unit = v / torch.linalg.vector_norm(v)
    (rounding, twin_products), rounding_s = timed(lambda: measured_rounding(op, unit, op.matvec(unit), 0.0))
    del v, unit
    _return_freed_memory()
    memory = op.memory()  # the first product kept the graph: what is available now is what the basis may use
    transient = memory["measured_peak_bytes"] - memory["kept_graphs_bytes"]
    budget = available_bytes() - transient - SPARE_VECTORS * 8 * n - MARGIN_BYTES
    est, seconds = timed(lambda: lanczos(op, tol=ACCURACY, basis_dtype=torch.float32, basis_budget=budget,
                                         rounding=rounding))
    p = est.payload
    out["lambda_max"] = {"tol": ACCURACY, "value": est.value, "error": est.error, "interval": p["interval"],
                         "converged": est.converged, "hvps": est.hvp_count + 1 + twin_products,
                         "seconds": seconds + rounding_s,
                         "error_kind": est.error_kind, "steps": p["steps"], "max_iter": est.settings["max_iter"],
                         "limited_by": est.settings["max_iter_limited_by"], "basis_budget_bytes": budget,
                         "residual": p["residuals"][0], "kato_temple": p["kato_temple"]["values"][0],
                         "rounding": p["rounding"], "failure_probability": p["failure_probability"]}
    return out
