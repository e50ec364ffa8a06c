"""The generalized Gauss-Newton matrix G = sum_b w_b J_b^T H_b J_b of the same mean loss.

J_b = d outputs / dx (x = parameters or an activation, as in `ParamHessian` / `ActivationHessian`) and
H_b = the Hessian of the loss w.r.t. the outputs (logits). For the default mean cross-entropy over the N
non-ignored targets, H_b = (1/N) blockdiag_i(diag(p_i) - p_i p_i^T), p_i = softmax(logits_i): G is then
positive semi-definite. H - G is the part of the Hessian from the curvature of the network (sum_k dL/dz_k
times the Hessian of output k). Products are a jvp, H_b u in closed form, and a vjp; G is never materialised.
"""

import functools

import torch

from hessian_tools.errors import UserError
from hessian_tools.operators.batch_operator import BatchOperator
from hessian_tools.operators.hvp import GaussNewtonProduct
from hessian_tools.operators.spaces import ActivationSpace, ParamSpace

IGNORE_INDEX = -100


def default_output(model, batch):
    """Logits model(batch[0])."""
    return model(batch[0])


def cross_entropy(logits, batch):
    """Mean cross-entropy of logits (..., V) against targets batch[-1] (...), ignoring IGNORE_INDEX."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2), batch[-1].flatten(), ignore_index=IGNORE_INDEX)


def cross_entropy_hvp(logits, u, batch):
    """Closed-form Hessian of `cross_entropy` w.r.t. the logits, applied to u: (p * u - p (p . u)) / N."""
    mask = (batch[-1] != IGNORE_INDEX).unsqueeze(-1)
    p = torch.softmax(logits, dim=-1)
    pu = p * u
    return (pu - p * pu.sum(-1, keepdim=True)) * mask / mask.sum()


class GaussNewton(BatchOperator):
    """GGN w.r.t. the parameters (`params` as in ParamHessian) or at an activation `site` (not both).

    `output_fn(model, batch) -> outputs` (default: model(batch[0])) and `output_loss(outputs, batch) -> scalar`
    (default: mean cross-entropy, whose output Hessian is used in closed form; a custom `output_loss` is
    differentiated twice by jvp-of-grad, and G is PSD only if it is convex in the outputs).
    """

    kind = "gauss-newton"
    modes = ("jvp-vjp",)

    def __init__(self, model, batches, site=None, params=None, output_fn=None, output_loss=None, dtype=None,
                 keep_graph=True, batch_weight=None, chunk="auto", memory_budget=None):
        if site is not None and params is not None:
            raise UserError("give either site (activation space) or params (parameter space), not both")
        self._options = dict(site=site, params=params, output_fn=output_fn, output_loss=output_loss,
                             keep_graph=keep_graph, batch_weight=batch_weight, chunk=chunk,
                             memory_budget=memory_budget)
        self.output_fn = output_fn or default_output
        self.output_loss = output_loss or cross_entropy
        self.closed_form = output_loss is None
        if site is None:
            space = functools.partial(ParamSpace, params=params)
        else:
            space = functools.partial(ActivationSpace, site=site)
        check = lambda model, batch: self.output_loss(self.output_fn(model, batch), batch)  # noqa: E731
        super().__init__(model, batches, space, check, dtype, "jvp-vjp", keep_graph, batch_weight, chunk,
                         memory_budget)

    def _outputs(self, batch):
        return self.space.function(self.output_fn, batch)

    def _output_hvp(self, batch, w):
        if self.closed_form:
            return lambda out, u: w * cross_entropy_hvp(out, u, batch)
        grad = torch.func.grad(lambda out: self.output_loss(out, batch))
        return lambda out, u: w * torch.func.jvp(grad, (out,), (u,))[1]

    def _engine(self, term, mode, keep_graph):
        return GaussNewtonProduct(self._outputs(term.batch), term.point, self._output_hvp(term.batch, term.weight),
                                  keep_graph)

    def _gradient(self, b, x):
        """Gradient at x of the loss of the linearised outputs, out0 + J (x - x0); its Jacobian is G's block."""
        batch = self.batches[b]
        g, x0 = self._outputs(batch), self.space.point(b)
        out0, vjp = torch.func.vjp(g, x0)
        step = torch.func.jvp(g, (x0,), (tuple(a - c for a, c in zip(x, x0)),))[1]
        dloss = torch.func.grad(lambda out: self.output_loss(out, batch))(out0 + step)
        return vjp(self.weights[b] * dloss)[0]

    def settings(self) -> dict:
        loss = "mean cross-entropy (closed-form output Hessian)" if self.closed_form else repr(self.output_loss)
        return {**super().settings(), "output_loss": loss}
