"""Hessian of the mean loss w.r.t. the model's parameters (all, or a selection by names or regex)."""

import functools

from hessian_tools.operators.hessian import HessianOperator
from hessian_tools.operators.spaces import ParamSpace


class ParamHessian(HessianOperator):
    """H = d^2/dtheta^2 sum_b w_b loss_fn(model, batch_b), w_b proportional to the batch's loss terms.

    theta = the selected parameters (`params`: None for all, a list of names, or a regex searched in the
    names) flattened in `named_parameters()` order; other parameters and buffers stay fixed. Evaluated in
    `dtype` on a private copy of the model in eval mode. `mode`: "auto", "rev-rev", "fwd-rev" or
    "double-backward" ("auto" runs double-backward, the fastest on CPU; see BENCHMARKS.md); `keep_graph` keeps
    each batch's gradient graph for later products; `chunk` = columns per vmapped call in `matmat` (None: all at
    once; 1: a loop of matvecs; "auto": 1 on CPU, where vmap was measured 40-55 % slower per column, 16 on
    CUDA); `memory_budget` = bytes of working memory the products may use: the graphs are dropped or the
    batches split into micro-batches to stay within it (see `batch_operator.py`). One product costs one HVP
    per batch.
    """

    kind = "params"

    def __init__(self, model, batches, loss_fn=None, params=None, dtype=None, mode="auto", keep_graph=True,
                 batch_weight=None, chunk="auto", memory_budget=None):
        self._options = dict(loss_fn=loss_fn, params=params, mode=mode, keep_graph=keep_graph,
                             batch_weight=batch_weight, chunk=chunk, memory_budget=memory_budget)
        space = functools.partial(ParamSpace, params=params)
        super().__init__(model, batches, space, loss_fn, dtype, mode, keep_graph, batch_weight, chunk,
                         memory_budget)
