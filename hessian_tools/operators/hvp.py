"""Hessian-vector products of one scalar function f(x) at a point x0, in three modes (never `jacrev`).

x0 and the tangents are tuples of tensors. `keep_graph=True` builds the reverse graph of the gradient once
and reuses it for every product at the same point (memory: one double-backward graph per term).
- "rev-rev": `torch.func.vjp` of `torch.func.grad(f)`; the vjp function keeps the graph.
- "fwd-rev": `torch.func.jvp` of `torch.func.grad(f)`; one forward-mode pass per product, nothing kept.
- "double-backward": `torch.autograd.grad` with `create_graph=True`, then a backward of the gradient.
`many(T)` takes tangents with a leading axis of k columns and maps the product over it.
"""

import time

import torch

MODES = ("rev-rev", "fwd-rev", "double-backward")


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


class FwdRev:
    name = "fwd-rev"

    def __init__(self, f, x0, keep_graph=True):
        self.f, self.x0 = f, x0

    def __call__(self, t):
        return torch.func.jvp(torch.func.grad(self.f), (self.x0,), (t,))[1]

    def many(self, T):
        return torch.func.vmap(self)(T)


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


def time_engines(f, x0, example, modes=MODES, keep_graph=True):
    """{mode: seconds for one product after a warm-up product}, the warm engines, and the gradient time."""
    timings, engines = {}, {}
    grad = torch.func.grad(f)
    grad(x0)
    start = time.perf_counter()
    grad(x0)
    grad_s = time.perf_counter() - start
    for mode in modes:
        engine = ENGINES[mode](f, x0, keep_graph)
        engine(example)
        start = time.perf_counter()
        engine(example)
        timings[mode] = time.perf_counter() - start
        engines[mode] = engine
    return timings, engines, grad_s
