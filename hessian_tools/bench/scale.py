"""The GPT-2-small shape (124M parameters) at realistic token counts on this machine: gradient, one HVP per mode
(kept graph and fresh), peak memory per mode, and lambda_max to ACCURACY by Lanczos (HVPs and wall time)."""

from __future__ import annotations

import os

import torch

from hessian_tools.bench.common import best_times, gradient_fn, timed
from hessian_tools.estimators.krylov import BLOCK

GPT2_SMALL = dict(arch="gpt2", vocab_size=50304, dim=768, n_layers=12, n_heads=12, seq_len=256)
TOKENS = (4, 256)  # batch x sequence length
QUICK = dict(arch="gpt2", vocab_size=64, dim=16, n_layers=1, n_heads=2, seq_len=8)
QUICK_TOKENS = (2, 8)
ACCURACY = 1e-3


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
    out["n_params"] = int(v.numel())
    basis = 8 * out["n_params"] * BLOCK  # Lanczos' float64 basis grows in blocks of BLOCK vectors
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if basis > memory / 2:
        out["lambda_max"] = {"skipped": f"one block of the float64 Krylov basis ({BLOCK} vectors, {basis / 2**30:.1f} "
                                        f"GiB) exceeds half of this machine's {memory / 2**30:.0f} GiB"}
        return out
    say("scale: lambda_max")
    est, seconds = timed(lambda: lanczos(ParamHessian(model, [batch], dtype=torch.float32), tol=ACCURACY))
    out["lambda_max"] = {"value": est.value, "error": est.error, "converged": est.converged, "hvps": est.hvp_count,
                         "seconds": seconds, "error_kind": est.error_kind}
    return out
