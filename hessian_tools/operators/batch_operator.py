"""An operator that is a weighted sum of per-term products, each acting on its block of the flat vector.

A term is a batch, or a micro-batch of its rows when a memory budget asks for it. Term t has the function f_t
(its rows' loss as a function of its block x_t, times its weight w_t), the point x0_t and its product engine
(see `hvp.py`), built on first use and kept, with its graph unless the memory plan drops it.

Memory (`settings()["memory"]`, bytes). The first product of every term is measured (`memory.MemoryMeter`):
its peak above what existed before, and the graph it leaves alive. `measured_peak_bytes` is the largest of
(graphs kept by earlier terms + a term's first-product peak): the operator's working memory beyond the model,
the batches and the vectors. With `memory_budget` (that working memory, in bytes) the plan is made before
the first product: probe products on the first 1 and 2 rows of the largest batch (counted in `hvp_count` and
in `settings()["memory"]["probe"]`) give the per-row and fixed bytes of a kept graph and of a product's peak,
linear in the rows; then the graphs are kept if all of them plus one product's temporaries fit, else every
product builds and frees its graph, else the batches are split into micro-batches of the most rows that fit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from hessian_tools.errors import UserError
from hessian_tools.operators.base import CurvatureOperator
from hessian_tools.operators.batches import (
    DTYPES,
    batch_rows,
    loss_terms,
    model_device,
    prepare_batches,
    private_copy,
    resolve_dtype,
    split_rows,
)
from hessian_tools.operators.hvp import AUTO_MODE, MODES
from hessian_tools.operators.memory import MemoryMeter, tensor_bytes
from hessian_tools.operators.spaces import flatten, flatten_columns, unflatten


@dataclass(frozen=True)
class Term:
    """One product term: rows [start, stop) of batch `index`, its weight, point and block of the flat vector."""

    index: int
    batch: tuple
    weight: float
    point: tuple
    offset: int
    size: int
    shapes: list
    rows: tuple


class BatchOperator(CurvatureOperator):
    """Shared machinery: private model copy, batches and weights, the space, the memory plan, products by term.

    Subclasses set `kind` and implement `_engine(term, mode, keep_graph)` and `_gradient(b, x)` (the gradient
    of batch b's term at x, whose derivative at x0_b is the operator's block: used by the self-check).
    """

    modes = MODES
    auto_mode = AUTO_MODE

    def __init__(self, model, batches, space_factory, check_fn, dtype, mode, keep_graph, batch_weight, chunk,
                 memory_budget=None):
        if mode != "auto" and mode not in self.modes:
            raise UserError(f"unknown HVP mode {mode!r}; choose auto or one of {', '.join(self.modes)}")
        if memory_budget is not None and not (isinstance(memory_budget, (int, float)) and memory_budget > 0):
            raise UserError(f"memory budget {memory_budget!r} must be a positive number of bytes")
        dtype = resolve_dtype(model, dtype)
        device = model_device(model)
        self._model = private_copy(model, dtype, device)
        self.batches, self.weights, self.loss_terms = prepare_batches(batches, dtype, device, batch_weight)
        self.batch_weight = batch_weight
        self.space = space_factory(self._model, len(self.batches))
        self.losses = self.space.check(check_fn, self.batches)
        super().__init__(self.space.n, dtype, device)
        self.requested_mode, self.keep_graph, self.chunk = mode, keep_graph, chunk
        self.memory_budget = None if memory_budget is None else int(memory_budget)
        self._terms = None
        self._memory = {"budget_bytes": self.memory_budget, "probe": None, "plan": None}

    @property
    def total_weight(self) -> float:
        """The raw sum of the batch weights (loss terms): what `DistributedOperator` weights ranks by."""
        return float(sum(self.loss_terms))

    @property
    def mode(self) -> str:
        """The product mode that runs: the requested one, or `auto_mode` for "auto" (no measurement)."""
        return self.auto_mode if self.requested_mode == "auto" else self.requested_mode

    def _engine(self, term: Term, mode: str, keep_graph: bool):
        raise NotImplementedError

    def _gradient(self, b, x):
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------- terms

    def terms_of(self, b: int, rows_per_term: int | None = None) -> list[Term]:
        """Batch b as one term, or as micro-batches of `rows_per_term` rows (the last one may be shorter)."""
        batch, (off, size), shapes = self.batches[b], self.space.blocks[b], self.space.block_shapes(b)
        point, rows = self.space.point(b), batch_rows(self.batches[b])
        if rows_per_term is None or rows_per_term >= rows:
            return [Term(b, batch, self.weights[b], point, off, size, shapes, (0, rows))]
        per_row = self._row_size(b, rows)
        terms = []
        for start in range(0, rows, rows_per_term):
            stop = min(rows, start + rows_per_term)
            sub = split_rows(batch, start, stop)
            weight = self.weights[b] * loss_terms(sub, self.batch_weight) / self.loss_terms[b]
            if per_row is None:  # parameter space: every term acts on the whole vector
                terms.append(Term(b, sub, weight, point, off, size, shapes, (start, stop)))
            else:
                sub_shapes = [(stop - start, *shapes[0][1:])]
                terms.append(Term(b, sub, weight, tuple(x[start:stop] for x in point), off + start * per_row,
                                  (stop - start) * per_row, sub_shapes, (start, stop)))
        return terms

    def _row_size(self, b, rows):
        """Entries per row of batch b's block in activation space (None in parameter space)."""
        if self.space.kind != "activation":
            return None
        shape = self.space.block_shapes(b)[0]
        if not shape or shape[0] != rows:
            raise UserError(f"the activation at {self.space.site} has shape {tuple(shape)}, whose leading axis is "
                            f"not the batch's {rows} rows: it cannot be split into micro-batches; raise the budget")
        return int(torch.Size(shape[1:]).numel())

    def _plan(self):
        """Terms and engines on first use (the memory plan first, when there is a budget)."""
        if self._terms is not None:
            return self._terms
        keep, rows = self.keep_graph, None
        if self.memory_budget is not None:
            keep, rows = self._plan_for_budget()
        self._memory["plan"] = ("kept graphs" if keep else "a fresh graph per product") + (
            "" if rows is None else f", micro-batches of {rows} rows")
        self._memory["rows_per_term"] = rows
        terms = [t for b in range(len(self.batches)) for t in self.terms_of(b, rows)]
        self._terms = [[t, self._engine(t, self.mode, keep), None] for t in terms]  # [term, engine, measured]
        return self._terms

    def _probe(self, b: int, rows: int) -> tuple[float, float]:
        """(peak, kept graph) bytes of one product with its graph kept, on the first `rows` rows of batch b."""
        term = self.terms_of(b, rows)[0]
        engine = self._engine(term, self.mode, True)
        gen = torch.Generator(device="cpu").manual_seed(0)
        t = tuple(torch.randn(s, generator=gen, dtype=self.dtype).to(self.device) for s in term.shapes)
        with MemoryMeter(self.device) as meter:
            out = engine(t)
            left = tensor_bytes(out)
        engine.release()
        self.hvp_count += 1
        return float(meter.peak), float(max(meter.live - left, 0))

    def _plan_for_budget(self) -> tuple[bool, int | None]:
        budget = self.memory_budget
        b = max(range(len(self.batches)), key=lambda i: batch_rows(self.batches[i]))
        rows = batch_rows(self.batches[b])
        start = time.perf_counter()
        sizes = (1, 2) if rows >= 2 else (rows,)
        peaks, graphs = zip(*(self._probe(b, r) for r in sizes))
        if len(sizes) == 2:  # bytes = fixed + per_row * rows, from the two probes
            per_peak, per_graph = max(peaks[1] - peaks[0], 0.0), max(graphs[1] - graphs[0], 0.0)
            fixed_peak, fixed_graph = max(peaks[0] - per_peak, 0.0), max(graphs[0] - per_graph, 0.0)
        else:
            per_peak, per_graph, fixed_peak, fixed_graph = peaks[0] / rows, graphs[0] / rows, 0.0, 0.0
        counts = [batch_rows(batch) for batch in self.batches]
        peak = [fixed_peak + per_peak * r for r in counts]
        graph = [fixed_graph + per_graph * r for r in counts]
        kept_total = sum(graph) + max(p - g for p, g in zip(peak, graph))
        self._memory["probe"] = {"products": len(sizes), "rows": list(sizes), "batch": b,
                                 "seconds": time.perf_counter() - start, "per_row_peak_bytes": per_peak,
                                 "fixed_peak_bytes": fixed_peak, "per_row_graph_bytes": per_graph,
                                 "fixed_graph_bytes": fixed_graph}
        self._memory["predicted_kept_graphs_bytes"] = sum(graph)
        if self.keep_graph and kept_total <= budget:
            self._memory["predicted_peak_bytes"] = kept_total
            return True, None
        if max(peak) <= budget:
            self._memory["predicted_peak_bytes"] = max(peak)
            return False, None
        fit = math.floor((budget - fixed_peak) / per_peak) if per_peak > 0 else 0
        if fit < 1:
            raise UserError(f"memory budget {budget:,} bytes is below one row's product ({fixed_peak + per_peak:,.0f} "
                            "bytes predicted); raise --memory-budget")
        self._memory["predicted_peak_bytes"] = fixed_peak + per_peak * fit
        return False, fit

    # -------------------------------------------------------------------------------------------- products

    def _product(self, i: int, x, single: bool):
        """Term i's product on x (a tuple, with a leading column axis unless `single`); the first one measured."""
        term, engine, measured = self._terms[i]
        run = engine if single else engine.many
        if measured is not None:
            return run(x)
        held = sum(m["graph_bytes"] for _, _, m in self._terms[:i] if m is not None)
        with MemoryMeter(self.device) as meter:
            out = run(x)
            left = tensor_bytes(out)
        kept = getattr(engine, "keep_graph", False)
        self._terms[i][2] = {"peak_bytes": meter.peak + held, "graph_bytes": max(meter.live - left, 0) if kept else 0}
        return out

    def _apply(self, V, single):
        terms = self._plan()
        if len(terms) == 1 and terms[0][0].size == V.shape[0]:
            term = terms[0][0]
            out = self._product(0, unflatten(V, term.shapes), single)
            return flatten(out) if single else flatten_columns(out)
        out = torch.zeros_like(V)
        for i, (term, _, _) in enumerate(terms):
            off, size = term.offset, term.size
            part = self._product(i, unflatten(V[off: off + size], term.shapes), single)
            out[off: off + size] += flatten(part) if single else flatten_columns(part)
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
        return torch.cat([self._apply(V[:, j: j + step], False) for j in range(0, k, step)], dim=1)

    def gradient(self, shift: torch.Tensor | None = None) -> torch.Tensor:
        """Flat float64 gradient of the operator's function at the point + shift (used by the self-check)."""
        out = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        for b in range(len(self.batches)):
            off, size = self.space.blocks[b]
            x = self.space.point(b)
            if shift is not None:
                part = shift[off: off + size].to(device=self.device, dtype=self.dtype)
                delta = unflatten(part, self.space.block_shapes(b))
                x = tuple(p + d for p, d in zip(x, delta))
            out[off: off + size] += flatten(self._gradient(b, x))
        return out.to(torch.float64)

    def block_products(self, v: torch.Tensor) -> list[torch.Tensor]:
        """Each batch's term of H v separately (not counted; used to name a batch whose product is not finite)."""
        v = self._cast(v, 1)
        terms = {}
        for i, (term, _, _) in enumerate(self._plan()):
            part = flatten(self._product(i, unflatten(v[term.offset: term.offset + term.size], term.shapes), True))
            terms[term.index] = part if term.index not in terms else terms[term.index] + part
        return [terms[b] for b in range(len(self.batches))]

    def with_dtype(self, dtype) -> "BatchOperator":
        """The same operator at the same point (this operator's model copy), evaluated in another dtype."""
        return type(self)(self._model, self.batches, dtype=dtype, **self._options)

    def memory(self) -> dict:
        """The memory plan and what the first products measured (bytes; see the module docstring)."""
        measured = [m for _, _, m in self._terms or () if m is not None]
        return {**self._memory,
                "measured_peak_bytes": max((m["peak_bytes"] for m in measured), default=None),
                "kept_graphs_bytes": sum(m["graph_bytes"] for m in measured) if measured else None,
                "terms": len(self._terms) if self._terms is not None else None}

    def settings(self) -> dict:
        return {
            "kind": self.kind,
            "n": self.shape[0],
            "dtype": DTYPES[self.dtype],
            "device": str(self.device),
            "mode": self.mode,
            "requested_mode": self.requested_mode,
            "keep_graph": self.keep_graph,
            "memory": self.memory(),
            "n_batches": len(self.batches),
            "loss_terms_per_batch": self.loss_terms,
            "batch_weights": self.weights,
            "batch_losses": self.losses,
            "scaled": "none",
            **self.space.describe(),
        }

