"""The tensor-parallel group as the model and the runner see it: three collectives.

A model holds one `TensorParallelGroup` and calls it where partial results meet (after a
row-parallel matmul, after the vocab-parallel embedding, on the logits). With one rank every
collective returns its input untouched and torch.distributed is never imported, so a
single-device model runs exactly the code it always ran. The process group itself is built by
the worker (kvport/torch_worker/distributed.py), before the model.

A platform may add a faster all-reduce for the tensors it handles well (`fast_all_reduce`,
e.g. kvport-cuda's symmetric-memory one for decode-sized tensors); everything else goes
through torch.distributed.
"""
from __future__ import annotations

from typing import Protocol

import torch


class FastAllReduce(Protocol):
    """A platform's in-place sum over the ranks for some tensors (see `handles`)."""

    def handles(self, x: torch.Tensor) -> bool:
        """Whether this tensor (dtype, size, device) is one this all-reduce takes."""

    def all_reduce_(self, x: torch.Tensor) -> None:
        """Overwrite `x` with its sum over the ranks (every rank calls it, in the same order)."""

    def staging_for(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """A tensor of `shape` and `dtype` in the all-reduce's own input buffer, for a producer
        (a row-parallel matmul) to write into, saving the copy in; None if this all-reduce does
        not take such a tensor. Valid until the next all-reduce."""

    def all_reduce_staged(self, staged: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of `staged` (from `staging_for`, written by every rank in the
        same order of calls), as a new tensor."""


class TensorParallelGroup:
    """This process's rank in a group of `world_size` ranks over torch.distributed's default
    process group (one group per worker process)."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a group of {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.fast_all_reduce: FastAllReduce | None = None     # set by the platform's worker
        # Row-parallel partial products summed in float32 and rounded once (ParallelConfig.
        # tp_reduce_dtype "float32"), instead of rounded per rank and summed in the model dtype.
        self.reduce_in_float32 = False

    @property
    def is_first(self) -> bool:
        """Rank 0 receives the logits, samples and answers for the group."""
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place; every rank gets the sum."""
        if self.world_size > 1:
            fast = self.fast_all_reduce
            if fast is not None and fast.handles(x):
                fast.all_reduce_(x)
            else:
                import torch.distributed as dist
                dist.all_reduce(x)
        return x

    def sum_in_fixed_order(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over the ranks added pairwise in rank order: r0 + r1 with two ranks,
        (r0 + r1) + (r2 + r3) with four, and so on. Every rank gets the same bits, and they
        are the bits one device gets adding the same partials in the same tree, whatever the
        collective's own order (tp_invariant, kvport/models/invariant.py). May reuse `x`."""
        if self.world_size == 1:
            return x
        if self.world_size == 2:                  # one addition: no order to differ in
            return self.all_reduce(x)
        return pairwise_sum(self.all_gather(x))

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` stacked in rank order: [world_size, *x.shape] on every rank."""
        import torch.distributed as dist
        out = torch.empty((self.world_size, *x.shape), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x.contiguous())
        return out

    def linear_all_reduce(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x W^T summed over the ranks: a row-parallel layer's product, written straight into
        the platform all-reduce's buffer where it offers one (x [..., in], W [out, in])."""
        fast = self.fast_all_reduce
        # (out= takes no autograd: under inference_mode / no_grad only, as the runners work)
        if (self.world_size > 1 and fast is not None and x.device == weight.device
                and not torch.is_grad_enabled()):
            shape = (*x.shape[:-1], weight.shape[0])
            staged = fast.staging_for(shape, x.dtype)
            if staged is not None:
                torch.mm(x.reshape(-1, x.shape[-1]), weight.t(),
                         out=staged.view(-1, weight.shape[0]))
                return fast.all_reduce_staged(staged)
        return self.all_reduce(torch.nn.functional.linear(x, weight))

    def gather_to_first(self, x: torch.Tensor, size: int) -> torch.Tensor | None:
        """Concatenate every rank's `x` [N, shard] along the last dimension on rank 0 and keep
        the first `size` columns (the shards are padded to equal widths); None elsewhere."""
        if self.world_size == 1:
            return x[..., :size]
        import torch.distributed as dist
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.is_first else None
        dist.gather(x, parts, dst=0)
        return torch.cat(parts, dim=-1)[..., :size] if self.is_first else None

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        """Overwrite `x` on every rank with rank 0's `x` (same shape and dtype everywhere)."""
        if self.world_size > 1:
            import torch.distributed as dist
            dist.broadcast(x, src=0)
        return x

    def __repr__(self) -> str:
        return f"TensorParallelGroup(rank={self.rank}, world_size={self.world_size})"


def pairwise_sum(parts: torch.Tensor) -> torch.Tensor:
    """parts [n, ...] (n a power of two) added as a balanced binary tree over the first
    dimension, neighbours first: ((p0 + p1) + (p2 + p3)) + ..."""
    if parts.shape[0] & (parts.shape[0] - 1):
        raise ValueError(f"a pairwise tree needs a power-of-two count, got {parts.shape[0]}")
    while parts.shape[0] > 1:
        parts = parts[0::2] + parts[1::2]
    return parts[0]


SINGLE_GROUP = TensorParallelGroup()
