"""Hessian of the mean loss w.r.t. the activation at a named site (`MODULE:in` or `MODULE:out`)."""

import functools

from hessian_tools.operators.hessian import HessianOperator
from hessian_tools.operators.spaces import ActivationSpace


class ActivationHessian(HessianOperator):
    """H = d^2/da^2 sum_b w_b loss_fn(model, batch_b) for the full activation a_b of each batch at `site`.

    The flat vector concatenates the activations (e.g. B x T x d each) of all batches; a_b only affects batch
    b, so H is block diagonal with blocks w_b * Hessian of batch b's mean loss. The module of the site must run
    once per forward pass. Options as in `ParamHessian`.
    """

    kind = "activation"

    def __init__(self, model, batches, site, loss_fn=None, dtype=None, mode="auto", keep_graph=True,
                 batch_weight=None, chunk="auto", memory_budget=None):
        self._options = dict(site=site, loss_fn=loss_fn, mode=mode, keep_graph=keep_graph,
                             batch_weight=batch_weight, chunk=chunk, memory_budget=memory_budget)
        space = functools.partial(ActivationSpace, site=site)
        super().__init__(model, batches, space, loss_fn, dtype, mode, keep_graph, batch_weight, chunk,
                         memory_budget)
