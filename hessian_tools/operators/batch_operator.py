"""An operator that is a weighted sum of per-batch products, each acting on its block of the flat vector.

Term b has the function f_b (the batch's loss as a function of its block x_b), the point x0_b and the weight
w_b; its product engine (see `hvp.py`) is built on first use and kept, with its graph, for later products.
"""

import torch

from hessian_tools.errors import UserError
from hessian_tools.operators.base import CurvatureOperator
from hessian_tools.operators.batches import DTYPES, model_device, prepare_batches, private_copy, resolve_dtype
from hessian_tools.operators.hvp import MODES, time_engines
from hessian_tools.operators.spaces import flatten, flatten_columns, unflatten

AUTO_CHOICES = {}  # (kind, model class, n, dtype, device, shapes) -> (mode, timings) of "auto"


class BatchOperator(CurvatureOperator):
    """Shared machinery: private model copy, batches and weights, the space, products block by block.

    Subclasses set `kind` and implement `_engine(b, mode)` and `_gradient(b, x)` (the gradient of term b
    at x, whose derivative at x0_b is the operator's block: used by the self-check's differences).
    """

    modes = MODES

    def __init__(self, model, batches, space_factory, check_fn, dtype, mode, keep_graph, batch_weight, chunk):
        if mode != "auto" and mode not in self.modes:
            raise UserError(f"unknown HVP mode {mode!r}; choose auto or one of {', '.join(self.modes)}")
        dtype = resolve_dtype(model, dtype)
        device = model_device(model)
        self._model = private_copy(model, dtype, device)
        self.batches, self.weights, self.loss_terms = prepare_batches(batches, dtype, device, batch_weight)
        self.space = space_factory(self._model, len(self.batches))
        self.losses = self.space.check(check_fn, self.batches)
        super().__init__(self.space.n, dtype, device)
        self.requested_mode, self.keep_graph, self.chunk = mode, keep_graph, chunk
        self._engines, self._mode, self.mode_timings = None, None, None

    @property
    def total_weight(self) -> float:
        """The raw sum of the batch weights (loss terms): what `DistributedOperator` weights ranks by."""
        return float(sum(self.loss_terms))

    @property
    def mode(self) -> str:
        """The product mode that runs ("auto" until the first product resolves it)."""
        return self._mode or self.requested_mode

    def engines(self) -> list:
        if self._engines is None:
            first = None
            if self.requested_mode == "auto":
                first = self._time_modes()
            else:
                self._mode = self.requested_mode
            self._engines = [first or self._engine(0, self._mode)]
            self._engines += [self._engine(b, self._mode) for b in range(1, len(self.batches))]
        return self._engines

    def _time_modes(self):
        """Time one product of each mode on batch 0 (after a warm-up) and keep the fastest.

        The choice is remembered for the process, keyed by model class, space, dtype, device and batch shapes,
        so operators rebuilt on other batches of the same shapes do not measure again.
        """
        shapes = self.space.block_shapes(0)
        key = (self.kind, type(self._model).__qualname__, self.shape[0], str(self.dtype), str(self.device),
               tuple(map(tuple, shapes)), tuple(tuple(t.shape) for t in self.batches[0] if hasattr(t, "shape")))
        if key in AUTO_CHOICES:
            self._mode, timings = AUTO_CHOICES[key]
            self.mode_timings = {**timings, "measured_earlier": True}
            return None
        gen = torch.Generator(device="cpu").manual_seed(0)
        example = tuple(torch.randn(s, generator=gen, dtype=self.dtype).to(self.device) for s in shapes)
        f = self._function(0)
        timings, warm, grad_s = time_engines(f, self.space.point(0), example, self.modes, self.keep_graph)
        self._mode = min(timings, key=timings.get)
        self.mode_timings = {"grad_s": grad_s, **{f"{m}_s": t for m, t in timings.items()}}
        AUTO_CHOICES[key] = (self._mode, self.mode_timings)
        return warm[self._mode]

    def _function(self, b):
        raise NotImplementedError

    def _engine(self, b, mode):
        raise NotImplementedError

    def _gradient(self, b, x):
        raise NotImplementedError

    def _apply(self, V, single):
        out = torch.zeros_like(V)
        for b, engine in enumerate(self.engines()):
            off, size = self.space.blocks[b]
            shapes = self.space.block_shapes(b)
            block = V[off : off + size]
            if single:
                out[off : off + size] += flatten(engine(unflatten(block, shapes)))
            else:
                out[off : off + size] += flatten_columns(engine.many(unflatten(block, shapes)))
        return out

    def _matvec(self, v):
        return self._apply(v, True)

    def _matmat(self, V):
        k, chunk = V.shape[1], self.chunk
        if chunk == "auto":
            chunk = 16 if self.device.type == "cuda" else 1
        step = k if chunk is None else max(1, int(chunk))
        if step == 1:
            return torch.stack([self._apply(V[:, j], True) for j in range(k)], dim=1)
        return torch.cat([self._apply(V[:, j : j + step], False) for j in range(0, k, step)], dim=1)

    def gradient(self, shift: torch.Tensor | None = None) -> torch.Tensor:
        """Flat float64 gradient of the operator's function at the point + shift (used by the self-check)."""
        out = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        for b in range(len(self.batches)):
            off, size = self.space.blocks[b]
            x = self.space.point(b)
            if shift is not None:
                part = shift[off : off + size].to(device=self.device, dtype=self.dtype)
                delta = unflatten(part, self.space.block_shapes(b))
                x = tuple(p + d for p, d in zip(x, delta))
            out[off : off + size] += flatten(self._gradient(b, x))
        return out.to(torch.float64)

    def block_products(self, v: torch.Tensor) -> list[torch.Tensor]:
        """Each batch's term of H v separately (not counted; used to name a batch whose product is not finite)."""
        v = self._cast(v, 1)
        terms = []
        for b, engine in enumerate(self.engines()):
            off, size = self.space.blocks[b]
            terms.append(flatten(engine(unflatten(v[off : off + size], self.space.block_shapes(b)))))
        return terms

    def with_dtype(self, dtype) -> "BatchOperator":
        """The same operator at the same point (this operator's model copy), evaluated in another dtype."""
        return type(self)(self._model, self.batches, dtype=dtype, **self._options)

    def settings(self) -> dict:
        return {
            "kind": self.kind,
            "n": self.shape[0],
            "dtype": DTYPES[self.dtype],
            "device": str(self.device),
            "mode": self.mode,
            "mode_timings": self.mode_timings,
            "keep_graph": self.keep_graph,
            "n_batches": len(self.batches),
            "loss_terms_per_batch": self.loss_terms,
            "batch_weights": self.weights,
            "batch_losses": self.losses,
            "scaled": "none",
            **self.space.describe(),
        }
