"""The Hessian of the weighted mean loss, sum_b w_b * loss_fn(model, batch_b), in any space (see `spaces.py`)."""

import torch

from hessian_tools.operators.batch_operator import BatchOperator
from hessian_tools.operators.hvp import ENGINES


def default_loss(model, batch):
    """Mean next-token cross-entropy (models.gpt.next_token_loss)."""
    from models.gpt import next_token_loss

    return next_token_loss(model, batch)


class HessianOperator(BatchOperator):
    def __init__(self, model, batches, space_factory, loss_fn, dtype, mode, keep_graph, batch_weight, chunk):
        self.loss_fn = loss_fn or default_loss
        super().__init__(model, batches, space_factory, self.loss_fn, dtype, mode, keep_graph, batch_weight, chunk)

    def _function(self, b):
        f, w = self.space.function(self.loss_fn, self.batches[b]), self.weights[b]
        return lambda x: w * f(x)

    def _engine(self, b, mode):
        return ENGINES[mode](self._function(b), self.space.point(b), self.keep_graph)

    def _gradient(self, b, x):
        return torch.func.grad(self._function(b))(x)

    def settings(self) -> dict:
        return {**super().settings(), "loss_fn": getattr(self.loss_fn, "__qualname__", repr(self.loss_fn))}
