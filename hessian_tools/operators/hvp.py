"""Hessian-vector products of one scalar function f(x) at a point x0, in three modes (never `jacrev`).

x0 and the tangents are tuples of tensors. `keep_graph=True` builds the reverse graph of the gradient once
and reuses it for every product at the same point (memory: one double-backward graph per term); `release()`
drops it. `many(T)` takes tangents with a leading axis of k columns and maps the product over it.
- "double-backward": `torch.autograd.grad` with `create_graph=True`, then a backward of the gradient.
- "rev-rev": `torch.func.vjp` of `torch.func.grad(f)`; the vjp function keeps the graph.
- "fwd-rev": `torch.func.jvp` of `torch.func.grad(f)`; one forward-mode pass per product, nothing kept.

Cost in matrix-multiply flops (a linear map Y = X W costs 1 forward, 2 in the gradient's backward, so a
gradient costs 3): a product on a kept graph differentiates the backward's 2 products (4) and back-propagates
into the forward (2): 6 = 2 gradients, Pearlmutter's bound. A fresh product also builds the graph: a forward
and the backward (3, of which the weight-gradient product, 1, is a value no HVP needs but autograd computes):
9 = 3 gradients, 8 / 3 = 2.67 at best. fwd-rev: a dual forward (1 + 2) and a dual backward (2 + 4): 9 = 3.
"""

import torch

MODES = ("rev-rev", "fwd-rev", "double-backward")
AUTO_MODE = "double-backward"  # what "auto" runs: the fastest mode on CPU, kept and fresh (BENCHMARKS.md)


class RevRev:
    name = "rev-rev"

    def __init__(self, f, x0, keep_graph=True):
        self.f, self.x0, self.keep_graph, self._fn = f, x0, keep_graph, None

    def _vjp(self):
        if self._fn is not None:
            return self._fn
        _, fn = torch.func.vjp(torch.func.grad(self.f), self.x0)
        if self.keep_graph:
            self._fn = fn
        return fn

    def __call__(self, t):
        return self._vjp()(t)[0]

    def many(self, T):
        fn = self._vjp()
        return torch.func.vmap(lambda t: fn(t)[0])(T)

    def release(self):
        self._fn = None


class FwdRev:
    name = "fwd-rev"

    def __init__(self, f, x0, keep_graph=True):
        self.f, self.x0 = f, x0

    def __call__(self, t):
        return torch.func.jvp(torch.func.grad(self.f), (self.x0,), (t,))[1]

    def many(self, T):
        return torch.func.vmap(self)(T)

    def release(self):
        pass


class DoubleBackward:
    name = "double-backward"

    def __init__(self, f, x0, keep_graph=True):
        self.f, self.x0, self.keep_graph, self._graph = f, x0, keep_graph, None

    def _build(self):
        if self._graph is not None:
            return self._graph
        xs = tuple(x.detach().requires_grad_() for x in self.x0)
        with torch.enable_grad():
            grads = torch.autograd.grad(self.f(xs), xs, create_graph=True, materialize_grads=True)
        live = [i for i, g in enumerate(grads) if g.requires_grad]  # a constant gradient has no graph
        graph = (xs, [grads[i] for i in live], live)
        if self.keep_graph:
            self._graph = graph
        return graph

    def _backward(self, T, batched):
        xs, grads, live = self._build()
        if not grads:
            return tuple(torch.zeros_like(t) for t in T)
        return torch.autograd.grad(
            grads,
            xs,
            grad_outputs=[T[i] for i in live],
            retain_graph=self.keep_graph,
            materialize_grads=True,
            is_grads_batched=batched,
        )

    def __call__(self, t):
        return self._backward(t, False)

    def many(self, T):
        return self._backward(T, True)

    def release(self):
        self._graph = None


ENGINES = {cls.name: cls for cls in (RevRev, FwdRev, DoubleBackward)}


class GaussNewtonProduct:
    """t -> J^T H_out J t for out = g(x) at x0: a jvp, the output-space product `out_hvp(out, u)`, a vjp."""

    name = "jvp-vjp"

    def __init__(self, g, x0, out_hvp, keep_graph=True):
        self.g, self.x0, self.out_hvp, self.keep_graph, self._vjp = g, x0, out_hvp, keep_graph, None

    def _transpose(self):
        if self._vjp is not None:
            return self._vjp
        out, fn = torch.func.vjp(self.g, self.x0)
        pair = (out.detach(), fn)
        if self.keep_graph:
            self._vjp = pair
        return pair

    def __call__(self, t):
        out, vjp = self._transpose()
        u = torch.func.jvp(self.g, (self.x0,), (t,))[1]
        return vjp(self.out_hvp(out, u))[0]

    def many(self, T):
        return torch.func.vmap(self)(T)

    def release(self):
        self._vjp = None
