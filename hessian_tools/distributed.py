"""Data parallelism with torch.distributed: each rank holds the operator on its share of the batches, and
every product is all-reduced, so each rank sees the operator on the union of the batches.

Contract with the inner operator (what `make_op(batches)` must return): the operator interface (shape,
matvec, matmat, hvp_count, device, dtype, mode, settings) for the Hessian of the *weighted mean* loss over
the batches it was given, plus `total_weight`, the sum of their weights (number of loss terms). Then
H_union = sum_r (W_r / W) H_r with W = sum_r W_r, which is what `matvec` returns on every rank.

Batches are dealt round-robin (rank r gets batches r, r + P, ...). The all-reduce (gloo on CPU, nccl on
GPU) returns the same bits on every rank, so an estimator run with the same seed on every rank performs
the identical Krylov iteration; no broadcast is needed. Run it under `torchrun` after `init_distributed()`.

`ShardedBlockOperator` is for operators that are block diagonal over batches (activation space): each rank owns
the blocks of its batches (their graphs, their products) and the same rows of every vector, so products need no
communication and the Krylov vectors are sharded: each rank keeps local_n ~ n / P entries of each. The estimators
all-reduce only the partial sums of inner products and norms, and draw random vectors at full length from the
same generator before keeping their own rows (hessian_tools.estimators._common), so a sharded run follows the
single-process iteration to rounding.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from hessian_tools.errors import UserError


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment; returns (rank, world_size).

    backend: "nccl" when CUDA is available, else "gloo" (override with `backend`). With CUDA, each rank
    uses device LOCAL_RANK. A no-op if the group already exists.
    """
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise UserError("no torch.distributed environment: launch with torchrun --nproc_per_node=N ...")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


class DistributedOperator:
    """The operator on the union of `batches`, evaluated data-parallel over the default process group.

    Each rank calls DistributedOperator(make_op, all_batches) with the same batch list; the local operator
    is make_op(this rank's share). hvp_count counts products of this operator (each costs every rank one
    HVP on its share, plus one all-reduce of n floats in float64).
    """

    def __init__(self, make_op: Callable[[list], object], batches: Sequence, group=None):
        if not dist.is_initialized():
            raise UserError("torch.distributed is not initialised: call hessian_tools.distributed.init_distributed()")
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        batches = list(batches)
        if len(batches) < self.world_size:
            raise UserError(f"{len(batches)} batches for {self.world_size} ranks: pass at least one batch per rank")
        self.mine = list(range(self.rank, len(batches), self.world_size))
        self.local = make_op([batches[b] for b in self.mine])
        if not hasattr(self.local, "total_weight"):
            raise UserError("the operator from make_op has no total_weight: expose the sum of its batch weights")
        self.shape, self.device, self.dtype = self.local.shape, self.local.device, self.local.dtype
        weight = torch.tensor([float(self.local.total_weight)], dtype=torch.float64, device=self.device)
        dist.all_reduce(weight, group=self.group)
        self.total_weight = float(weight)
        self._share = float(self.local.total_weight) / self.total_weight
        self.hvp_count = 0

    @property
    def mode(self) -> str:
        """The local operator's HVP mode."""
        return self.local.mode

    def _apply(self, V: torch.Tensor, product) -> torch.Tensor:
        out = (product(V).to(torch.float64) * self._share).contiguous()
        dist.all_reduce(out, group=self.group)
        return out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """(H_union v) as float64, identical on every rank."""
        self.hvp_count += 1
        return self._apply(v, self.local.matvec)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """(H_union V) for V of shape (n, k), float64, identical on every rank."""
        self.hvp_count += V.shape[1]
        return self._apply(V, self.local.matmat)

    def settings(self) -> dict:
        return {**self.local.settings(), "world_size": self.world_size, "backend": dist.get_backend(self.group),
                "total_weight": self.total_weight, "rank_batches": self.mine}


class Shard:
    """This rank's rows of a length-n vector: the spans (offset, size) of the whole vector it owns, in order; its
    local vector is their concatenation (local_n entries). The communication of sharded estimators goes through
    here: `sum` (all-reduce of partial sums), `gather` (all-gather of a small tensor), `whole` (a full vector)."""

    def __init__(self, spans: list[tuple[int, int]], n: int, largest_local_n: int, group=None):
        self.spans, self.n, self.largest_local_n, self.group = spans, n, largest_local_n, group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.local_n = sum(size for _, size in spans)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of x (length n along dim 0) on this rank, concatenated."""
        return torch.cat([x[off: off + size] for off, size in self.spans])

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the ranks (an all-reduce of t.numel() entries; the same bits on every rank)."""
        t = t.contiguous().clone()
        dist.all_reduce(t, group=self.group)
        return t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """(world_size, *t.shape): every rank's t (same shape on every rank), in rank order."""
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.stack(parts)

    def whole(self, x: torch.Tensor) -> torch.Tensor:
        """The full length-n vector from every rank's shard x: an all-reduce of n entries, for one-off use."""
        out = torch.zeros(self.n, dtype=x.dtype, device=x.device)
        at = 0
        for off, size in self.spans:
            out[off: off + size] = x[at: at + size]
            at += size
        return self.sum(out)


class ShardedBlockOperator(DistributedOperator):
    """A block-diagonal operator over `batches` (e.g. ActivationHessian), each rank owning its batches' blocks
    and the same rows of every vector.

    The whole vector concatenates every batch's block in the order of `batches` (as the single-process operator
    does); shape is (n, n) for that n. Rank r holds make_op(batches r, r + P, ...) and its rows `shard` (a Shard:
    those batches' blocks, local_n entries). matvec / matmat take and return this rank's rows only: H is block
    diagonal, so (H v)_r = (W_r / W) H_r v_r, with H_r the local operator (its blocks weighted among themselves,
    w_b = m_b / W_r) and W_r / W its share of the union. Products communicate nothing; the estimators all-reduce
    only scalars and coefficient vectors (hessian_tools.estimators._common). Cost per product: one HVP per local
    batch.
    """

    def __init__(self, make_op: Callable[[list], object], batches: Sequence, group=None):
        super().__init__(make_op, batches, group)
        blocks = getattr(getattr(self.local, "space", None), "blocks", None)
        if blocks is None:
            raise UserError("the operator from make_op has no space.blocks: shard a block-diagonal operator over "
                            "batches (ActivationHessian)")
        every: list = [None] * self.world_size
        dist.all_gather_object(every, [(b, size) for b, (_, size) in zip(self.mine, blocks)], group=group)
        size_of = dict(pair for part in every for pair in part)
        offsets = [0]
        for b in range(len(size_of)):
            offsets.append(offsets[-1] + size_of[b])
        largest = max(sum(size for _, size in part) for part in every)
        self.shard = Shard([(offsets[b], size_of[b]) for b in self.mine], offsets[-1], largest, group)
        self.shape = (offsets[-1], offsets[-1])

    def _apply(self, V: torch.Tensor, product) -> torch.Tensor:
        """This rank's rows of H V from its rows of V ((local_n,) or (local_n, k)), float64, no communication."""
        return product(V).to(torch.float64) * self._share

    def settings(self) -> dict:
        return {**super().settings(), "n": self.shape[0], "local_n": self.shard.local_n, "sharded": True}
