"""The Hessian of the weighted mean loss, sum_b w_b * loss_fn(model, batch_b), in any space (see `spaces.py`)."""

import torch

from hessian_tools.operators.batch_operator import BatchOperator
from hessian_tools.operators.hvp import ENGINES


def default_loss(model, batch):
    """Mean next-token cross-entropy (models.gpt.next_token_loss)."""
    from models.gpt import next_token_loss

    return next_token_loss(model, batch)


class HessianOperator(BatchOperator):
    def __init__(self, model, batches, space_factory, loss_fn, dtype, mode, keep_graph, batch_weight, chunk,
                 memory_budget=None):
        self.loss_fn = loss_fn or default_loss
        super().__init__(model, batches, space_factory, self.loss_fn, dtype, mode, keep_graph, batch_weight, chunk,
                         memory_budget)

    def _function(self, batch, weight):
        f = self.space.function(self.loss_fn, batch)
        return lambda x: weight * f(x)

    def _engine(self, term, mode, keep_graph):
        return ENGINES[mode](self._function(term.batch, term.weight), term.point, keep_graph)

    def _gradient(self, b, x):
        return torch.func.grad(self._function(self.batches[b], self.weights[b]))(x)

    def settings(self) -> dict:
        return {**super().settings(), "loss_fn": getattr(self.loss_fn, "__qualname__", repr(self.loss_fn))}
