"""Batches of a mean loss and their weights, and the operator's private copy of the model.

Weighting: batch b gets w_b = m_b / sum_c m_c, m_b = `batch_weight(batch)` or, by default, the number of
targets `batch[-1].numel()`; with per-batch mean losses L_b, sum_b w_b L_b is the mean loss on the union.
"""

import copy
import math
import warnings

import torch
from torch import nn

from hessian_tools.errors import UserError

DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def resolve_dtype(model: nn.Module, dtype) -> torch.dtype:
    """float32 or float64; None -> float64 for a float64 model, float32 otherwise."""
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "float64": torch.float64}.get(dtype, dtype)
    if dtype is None:
        first = next((p for p in model.parameters() if p.is_floating_point()), None)
        dtype = torch.float64 if first is not None and first.dtype == torch.float64 else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unsupported evaluation dtype {dtype}; use float32 or float64")
    return dtype


def model_device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def has_active_dropout(model: nn.Module) -> bool:
    """Dropout modules with p > 0, or float `dropout` attributes > 0 (functional dropout, e.g. in attention)."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return True
        rate = getattr(module, "dropout", None)
        if isinstance(rate, float) and rate > 0:
            return True
    return False


def private_copy(model: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A deep copy in eval mode, cast to `dtype`, with gradients off; the user's model is never touched."""
    if model.training and has_active_dropout(model):
        warnings.warn("model is in train mode with active dropout; the curvature is computed in eval mode")
    twin = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    twin.requires_grad_(False)
    return twin


def prepare_batches(batches, dtype: torch.dtype, device: torch.device, batch_weight=None):
    """(batches moved to `device` with float tensors cast to `dtype`, normalised weights summing to 1)."""
    batches = list(batches) if batches is not None else []
    if not batches:
        raise UserError("no batches given; pass a non-empty list of batches, e.g. [(idx, targets)]")
    moved, weights = [], []
    for b, batch in enumerate(batches):
        if isinstance(batch, torch.Tensor) or not isinstance(batch, (tuple, list)) or not batch:
            raise UserError(f"batch {b} is not a non-empty tuple of tensors such as (inputs, targets)")
        batch = tuple(_move(t, dtype, device) for t in batch)
        m = loss_terms(batch, batch_weight)
        if not math.isfinite(m) or m <= 0:
            raise UserError(f"batch {b} has weight {m}; every batch needs a positive number of loss terms")
        moved.append(batch)
        weights.append(m)
    total = sum(weights)
    return moved, [m / total for m in weights], weights


def loss_terms(batch, batch_weight=None) -> float:
    """m_b: `batch_weight(batch)`, or the number of targets `batch[-1].numel()` by default."""
    return float(batch_weight(batch)) if batch_weight is not None else float(batch[-1].numel())


def batch_rows(batch) -> int:
    """The number of rows (sequences) of a batch: the length of the leading axis of its first tensor."""
    first = batch[0]
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.ndim else 1


def split_rows(batch, start: int, stop: int):
    """Rows [start, stop) of a batch: every tensor whose leading axis has the batch's row count is sliced.

    With the mean loss of the rows weighted by their loss terms (`loss_terms`), the micro-batches' weighted
    losses sum to the batch's mean loss when rows are independent (a GPT in eval mode: sequences do not
    interact)."""
    rows = batch_rows(batch)
    return tuple(t[start:stop] if isinstance(t, torch.Tensor) and t.ndim and t.shape[0] == rows else t
                 for t in batch)


def _move(t, dtype, device):
    if not isinstance(t, torch.Tensor):
        return t
    return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)


def check_loss(loss, b: int) -> float:
    """The loss of batch b as a float; UserError if it is not a finite scalar."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise UserError(f"loss_fn returned {type(loss).__name__} on batch {b}; it must return a scalar tensor")
    value = float(loss)
    if not math.isfinite(value):
        raise UserError(f"the loss is {value} on batch {b}; check that batch and the model's weights")
    return value
