"""What every benchmark part shares: model shapes, models and batches, timing, the machine's description.

Timing convention: a time is the fastest of `repeats` calls (on a shared machine the least disturbed one, as
timeit advises); candidates compared in one table take turns within each repeat, so a change of machine load
hits all of them alike. Wall-clock seconds (`time.perf_counter`) with the machine's torch threads.
"""

from __future__ import annotations

import copy
import os
import platform
import time

import torch
from torch import nn

ARCHS = ("llama2", "llama2_qknorm", "simplegpt", "gpt2", "simplegpt_gpt2")
SHAPES = {  # vocab 103 = the embedded corpus's characters
    "full": dict(dim=128, n_layers=4, n_heads=4, seq_len=128, batch=16, vocab=103, repeats=5),
    "quick": dict(dim=16, n_layers=1, n_heads=2, seq_len=8, batch=2, vocab=103, repeats=1),
}
DESCRIBED = ("dim", "n_layers", "n_heads", "seq_len", "batch", "vocab")


def make_model(arch: str, shape: dict, seed: int = 0) -> nn.Module:
    from models.config import GPTConfig
    from models.gpt import build_model

    torch.manual_seed(seed)
    cfg = GPTConfig(arch=arch, vocab_size=shape["vocab"], dim=shape["dim"], n_layers=shape["n_layers"],
                    n_heads=shape["n_heads"], seq_len=shape["seq_len"], norm_backend="torch")
    return build_model(cfg).eval()


def make_batch(shape: dict, seed: int = 0):
    """One held-out batch (idx, targets) of the embedded corpus, shape (batch, seq_len)."""
    from models.data import DataSpec, measurement_batches

    return measurement_batches(DataSpec(), 1, shape["batch"], shape["seq_len"], seed)[0]


def best_times(fns: dict, repeats: int) -> dict:
    """{name: the fastest of `repeats` calls of fns[name]()}, the candidates taking turns (module docstring)."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def timed(fn):
    """(fn(), seconds)."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def gradient_fn(model: nn.Module, batch):
    """A callable computing one gradient of the mean next-token loss (torch.autograd.grad, math attention)."""
    from models.gpt import math_attention, next_token_loss

    model = copy.deepcopy(model).requires_grad_(True)
    params = list(model.parameters())

    def grad():
        with math_attention():
            return torch.autograd.grad(next_token_loss(model, batch), params)

    return grad


def machine() -> dict:
    return {"cpu": platform.machine(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "load_average": list(os.getloadavg())}


def relative(value, reference) -> float | None:
    return None if value is None else abs(value - reference) / abs(reference)
