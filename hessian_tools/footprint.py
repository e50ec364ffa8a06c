"""Memory estimates made before allocating, and the one-line refusal of what cannot fit.

Estimates are lower bounds of the bytes a computation must hold at once (tensors only; the allocator, Python
and temporaries come on top), so a refusal is certain to be right and an accepted size may still be tight:
  model_bytes       parameters and buffers of a GPTConfig, counted exactly on the meta device (nothing allocated)
  activation_bytes  what one forward pass keeps for its backward: per token and layer the block's inputs of
                    its maps (about 8 dim + 3 ffn_hidden entries) and the attention probabilities (heads x
                    context), plus 3 vocab-wide rows of logits, softmax and its gradient
  training_bytes    weights, gradients and AdamW's two moments (4 copies of the parameters) + one batch's
                    activations
  graph_bytes       the graphs a Hessian-vector product keeps per batch: the forward's and the gradient's
                    (2 x activation_bytes)
  batch_bytes       int64 inputs and targets; krylov_bytes: float64 basis vectors; density_bytes: the SLQ grid
`require_memory(parts, what, device)` compares the sum with what the machine has available now (CPU:
MemAvailable and the cgroup limit; CUDA: free device memory) and raises a UserError naming both.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

from hessian_tools.errors import UserError

INT64, FLOAT64 = 8, 8


def format_bytes(n: float) -> str:
    for unit, size in (("EiB", 2**60), ("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def _cgroup_room() -> int | None:
    """Bytes the cgroup (v2) still lets this process allocate, or None without a limit."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def available_bytes(device="cpu") -> int:
    """Memory available now for new tensors on `device` (CPU: min of MemAvailable and the cgroup's room)."""
    device = str(device)
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        free = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    room = _cgroup_room()
    return free if room is None else min(free, room)


def require_memory(parts: dict, what: str, device="cpu"):
    """UserError (one line) when the estimated bytes `parts` ({name: bytes}) exceed the available memory."""
    total = sum(parts.values())
    free = available_bytes(device)
    if total > free:
        detail = ", ".join(f"{name} {format_bytes(b)}" for name, b in parts.items() if b)
        raise UserError(f"{what} needs at least {format_bytes(total)} of memory ({detail}), but {format_bytes(free)} "
                        f"is available on {device}: choose smaller sizes")


@functools.lru_cache(maxsize=64)
def model_elements(config) -> int:
    """Parameter and buffer elements of build_model(config), counted on the meta device for 1 and 2 blocks
    (so 1e9 layers cost nothing): fixed + per_block * n_layers."""
    import torch

    from models.gpt import build_model

    def count(n_layers):
        with torch.device("meta"):
            model = build_model(dataclasses.replace(config, n_layers=n_layers))
        return sum(t.numel() for t in (*model.parameters(), *model.buffers()))

    one, two = count(1), count(2)
    return one + (two - one) * (config.n_layers - 1)


def model_bytes(config, element_bytes: int = 4) -> int:
    return model_elements(config) * element_bytes


def activation_bytes(config, tokens: int, element_bytes: int = 4, context: int | None = None) -> int:
    """What a forward pass over `tokens` tokens (sequences of `context`, default config.seq_len) keeps for
    its backward: see the module docstring."""
    context = context or config.seq_len
    per_layer = 8 * config.dim + 3 * config.ffn_hidden + config.n_heads * context
    return tokens * element_bytes * (config.n_layers * per_layer + 3 * config.vocab_size)


def training_bytes(config, batch_size: int, seq_len: int, element_bytes: int = 4) -> dict:
    """{part: bytes} of one training step (for `require_memory`)."""
    return {"weights, gradients and AdamW state": 4 * model_bytes(config, element_bytes),
            "activations": activation_bytes(config, batch_size * seq_len, element_bytes, seq_len)}


def graph_bytes(config, batch_size: int, seq_len: int, element_bytes: int = 4) -> int:
    """The graphs one batch's Hessian-vector products keep (forward and gradient graphs)."""
    return 2 * activation_bytes(config, batch_size * seq_len, element_bytes, seq_len)


def batch_bytes(n_batches: int, batch_size: int, seq_len: int) -> int:
    """int64 inputs and targets of n_batches batches, and the window indices they are gathered with."""
    return 3 * INT64 * n_batches * batch_size * (seq_len + 1)


def krylov_bytes(n: int, vectors: int) -> int:
    return FLOAT64 * n * vectors


def density_bytes(points: int, steps: int) -> int:
    """The SLQ density on `points` grid points: a points x steps Gaussian table (one probe at a time), the grid
    and the density as lists and in the JSON record (about 100 bytes per point)."""
    return points * (3 * FLOAT64 * steps + 100)
