"""The operator on any union of fixed disjoint groups of batches, built from one operator per group.

Contract of `make_op(batches)` (the one `DistributedOperator` relies on): the operator of the *weighted mean*
loss over those batches, with `total_weight` = the sum of their weights (loss terms; without it, the number
of batches). Then the operator on a union S of groups is a reweighting of the group operators H_g:
- shared space (parameters, scaled parameters): H_S = sum_{g in S} (W_g / W_S) H_g, W_S = sum_{g in S} W_g;
- one block per batch (activations): H_S = the block-diagonal direct sum of the (W_g / W_S) H_g.
Which one holds is checked once, not assumed: make_op(group 0 + group 1) must agree with the combination of
the two group operators on one seeded random vector to RECOMBINE_TOL relative. Where it does not (the factory
is not linear in the data, e.g. a data-dependent scaling) every union is rebuilt with make_op instead.
Either way the group operators' products are what the unions cost: one union product = one product of each
member group's operator, so no batch is evaluated twice per product and no model is copied per union.
"""

from __future__ import annotations

import torch

from hessian_tools.errors import UserError

COMBINE = ("auto", "rebuild")
RECOMBINE_TOL = 1e-4  # relative agreement of one product; a mismatch this small moves no eigenvalue visibly


def check_combine(combine: str) -> str:
    if combine not in COMBINE:
        raise UserError(f"combine={combine!r} must be one of {', '.join(COMBINE)}")
    return combine


def split_groups(batches, n_groups: int, min_groups: int) -> list[list]:
    """`n_groups` disjoint contiguous groups of equal size; UserError unless len(batches) is a multiple."""
    batches = list(batches)
    if isinstance(n_groups, bool) or not isinstance(n_groups, int) or n_groups < min_groups:
        raise UserError(f"n_groups={n_groups!r} must be an integer >= {min_groups}")
    if len(batches) < n_groups or len(batches) % n_groups:
        raise UserError(f"{len(batches)} batches cannot form {n_groups} equal groups: "
                        f"pass a multiple of {n_groups} batches")
    size = len(batches) // n_groups
    return [batches[i * size:(i + 1) * size] for i in range(n_groups)]


class UnionOperator:
    """sum_i c_i H_i (shared space) or the direct sum of the c_i H_i (`blocks`), one product per member;
    `total_weight` = the members' summed weights (the operator contract of `make_op`)."""

    def __init__(self, ops: list, coefficients: list[float], blocks: bool, total_weight: float):
        self.ops, self.coefficients, self.blocks, self.total_weight = ops, coefficients, blocks, total_weight
        dims = [op.shape[0] for op in ops]
        self.offsets = [sum(dims[:i]) for i in range(len(dims) + 1)] if blocks else None
        n = self.offsets[-1] if blocks else dims[0]
        self.shape, self.device, self.dtype = (n, n), ops[0].device, ops[0].dtype
        self.hvp_count = 0

    @property
    def mode(self) -> str:
        return self.ops[0].mode

    def _apply(self, x: torch.Tensor, product) -> torch.Tensor:
        if self.blocks:
            return torch.cat([c * product(op, x[a:b]).to(torch.float64) for op, c, a, b in
                              zip(self.ops, self.coefficients, self.offsets[:-1], self.offsets[1:])])
        return sum(c * product(op, x).to(torch.float64) for op, c in zip(self.ops, self.coefficients))

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.hvp_count += 1
        return self._apply(v, lambda op, x: op.matvec(x))

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.hvp_count += V.shape[1]
        return self._apply(V, lambda op, x: op.matmat(x))

    def settings(self) -> dict:
        inner = getattr(self.ops[0], "settings", None)
        return {"kind": "union of batch groups", "combination": "block diagonal" if self.blocks else "weighted sum",
                "n_groups": len(self.ops), "coefficients": self.coefficients,
                "group_operator": dict(inner()) if callable(inner) else {}}


class BatchGroups:
    """One operator per group of batches, and the operator on any union of groups (see the module docstring).

    `how` is "weighted sum", "block diagonal" or "rebuilt"; `mismatch` the measured relative disagreement of
    the check (None when not checked); `check_hvps` the products the check cost. make_op's UserError (e.g. a
    batch whose loss is not finite) propagates.
    """

    def __init__(self, make_op, groups: list[list], combine: str = "auto"):
        check_combine(combine)
        self.make_op, self.groups = make_op, [list(g) for g in groups]
        self.ops, self.how, self.mismatch, self.check_hvps = None, "rebuilt", None, 0
        if combine == "auto" and len(self.groups) >= 2:
            self.ops = [make_op(g) for g in self.groups]
            self.weights = [float(getattr(op, "total_weight", len(g))) for op, g in zip(self.ops, self.groups)]
            self._check()

    def _combined(self, members: list[int], blocks: bool) -> UnionOperator:
        total = sum(self.weights[g] for g in members)
        return UnionOperator([self.ops[g] for g in members], [self.weights[g] / total for g in members], blocks,
                             total)

    def _check(self):
        pair = self.make_op(self.groups[0] + self.groups[1])
        dims = [op.shape[0] for op in self.ops]
        n = pair.shape[0]
        blocks = n == dims[0] + dims[1]
        if not blocks and any(d != n for d in dims):
            self.ops = None
            return
        v = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        combined = self._combined([0, 1], blocks)
        before = [op.hvp_count for op in self.ops[:2]]
        reference, mixed = pair.matvec(v).to(torch.float64), combined.matvec(v)
        self.check_hvps = 1 + sum(op.hvp_count - b for op, b in zip(self.ops[:2], before))
        self.mismatch = float(torch.linalg.vector_norm(reference - mixed) / torch.linalg.vector_norm(reference))
        if self.mismatch <= RECOMBINE_TOL:
            self.how = "block diagonal" if blocks else "weighted sum"
        else:
            self.ops = None  # not a reweighting (or not finite): rebuild every union

    def operator(self, members: list[int]):
        """The operator on the union of the groups `members` (indices, in order)."""
        if self.ops is None:
            return self.make_op([b for g in members for b in self.groups[g]])
        return self._combined(members, self.how == "block diagonal")

    def restrict(self, v, members: list[int], subset: list[int]):
        """A vector of operator(members) carried over to operator(subset): the subset's blocks where the
        space is per batch, the vector itself otherwise (the solver drops it if the length differs)."""
        if v is None or self.how != "block diagonal":
            return v
        dims = [self.ops[g].shape[0] for g in members]
        starts = dict(zip(members, [sum(dims[:i]) for i in range(len(dims))]))
        return torch.cat([v[starts[g]:starts[g] + self.ops[g].shape[0]] for g in subset])
