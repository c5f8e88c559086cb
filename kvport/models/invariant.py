"""Tensor-parallel-invariant numerics (`ParallelConfig.tp_invariant`): the same logits, bit for
bit, at tensor_parallel_size 1, 2, 4 and 8.

Why outputs move with the tensor-parallel size in the default mode: a column-parallel layer
on two ranks multiplies narrower matrices, for which the vendor library picks other kernels
(another tile, a split of K), and a row-parallel layer's two partial products are each
rounded to bf16 and then summed, where one device rounds once. Each difference is one bf16
rounding step, but 32 layers compound them, and on a random-weight model, whose top two
logits are often closer than that, two GPUs pick another top-1 token at about 15% of
positions (docs/benchmarks.md).

This mode removes both causes, on any platform that supplies an `InvariantMatmul`:
- every linear layer runs the platform's shape-invariant matmul: an output element's bits
  depend only on its input row and weight row, never on M, N or the tile it falls in, so a
  column shard computes exactly the columns the whole matrix would;
- a row-parallel layer cuts K into `TREE_LEAVES` equal groups, accumulates each group in
  float32 and adds the group sums in a fixed binary tree. With one device the kernel adds all
  eight; with two, each rank adds its four and `sum_in_fixed_order` adds the two halves, the
  tree's last addition. The float32 total is rounded once, by every rank alike;
- the LM head's output stays float32 (no bf16 rounding of the logits, whose top two often
  differ by less than one bf16 step), which helps sampling at any size.

Everything else is already invariant: the embedding's all-reduce adds zeros, norms and
element-wise kernels see whole rows, and attention is per head (the platform keeps its
split-KV choice independent of the head count). The cost is the platform kernel's speed
against the vendor library's and the float32 all-reduce: docs/benchmarks.md has the figures.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from kvport.core.config import ConfigError
from kvport.models.parallel_layers import ColumnParallelLinear, RowParallelLinear
from kvport.models.tp_group import TensorParallelGroup

_MISSING = object()

# Leaves of the tree of K-group sums: the largest tensor-parallel size the mode supports.
TREE_LEAVES = 8


class InvariantMatmul(Protocol):
    """A platform's shape-invariant x W^T (kvport-cuda: kvport_cuda/invariant_matmul.py)."""

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, *, k_groups: int = 1,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x [..., K] times weight [N, K] transposed -> [..., N] in `out_dtype` (x's dtype if
        None). K is cut into `k_groups` equal groups, each summed in float32 in K order, the
        group sums added in a balanced binary tree, the total rounded once. out[m, n] must
        depend only on x[m], weight[n] and k_groups, never on the shapes."""


class InvariantLinear(nn.Module):
    """A column-parallel layer (or the LM head) through the invariant matmul: y = x W^T + b,
    rounded to `out_dtype` (the input's dtype if None)."""

    def __init__(self, linear: nn.Linear | None, matmul: InvariantMatmul,
                 out_dtype: torch.dtype | None = None, weight: torch.Tensor | None = None):
        super().__init__()
        # Shares the loaded parameters (no copy): a tied LM head passes the embedding's.
        self.weight = linear.weight if linear is not None else weight
        self.bias = linear.bias if linear is not None else None
        self.matmul, self.out_dtype = matmul, out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = self.out_dtype or x.dtype
        if self.bias is None:
            return self.matmul(x, self.weight, out_dtype=out_dtype)
        y = self.matmul(x, self.weight, out_dtype=torch.float32)
        return (y + self.bias.float()).to(out_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, "
                f"bias={self.bias is not None}, out_dtype={self.out_dtype}, shape-invariant")


class InvariantRowLinear(nn.Module):
    """A row-parallel layer: this rank's float32 subtree of K-group sums, the ranks' subtrees
    added in the fixed order, then the bias, rounded once to the input's dtype."""

    def __init__(self, linear: RowParallelLinear, matmul: InvariantMatmul,
                 tp: TensorParallelGroup):
        super().__init__()
        full, world = linear.full_in_features, tp.world_size
        local = linear.weight.shape[1]
        if full % TREE_LEAVES or local * world != full or linear.start != tp.rank * local:
            raise ConfigError(
                f"tp_invariant: a row-parallel layer of {full} input features must be cut into "
                f"{TREE_LEAVES} equal groups and {world} equal rank slices; this rank holds "
                f"[{linear.start}, {linear.start + local}) (the heads or the intermediate size "
                "do not divide evenly)")
        self.weight, self.bias = linear.weight, linear.bias
        self.matmul, self.tp = matmul, tp
        self.k_groups = TREE_LEAVES // world

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = self.matmul(x, self.weight, k_groups=self.k_groups, out_dtype=torch.float32)
        total = self.tp.sum_in_fixed_order(partial)
        if self.bias is not None:
            total = total + self.bias.float()
        return total.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.weight.shape[1]} of {self.weight.shape[1] * self.tp.world_size}"
                f", out_features={self.weight.shape[0]}, bias={self.bias is not None}, "
                f"k_groups={self.k_groups}, float32 partial sums in a fixed tree")


def make_tp_invariant(model: nn.Module, matmul: InvariantMatmul,
                      tp: TensorParallelGroup) -> dict[str, int]:
    """Route every linear layer of a loaded model through `matmul`, in place (see the module
    docstring); returns how many layers of each kind. The model must expose `lm_head` (None
    when tied to `model.embed_tokens`) and `compute_logits` reading it, as LlamaForCausalLM
    does; a linear layer of any other type is refused, so none is left on other numerics."""
    if tp.world_size > TREE_LEAVES or TREE_LEAVES % tp.world_size:
        raise ConfigError(f"tp_invariant: tensor_parallel_size {tp.world_size} does not cut "
                          f"a tree of {TREE_LEAVES} leaves evenly")
    counts = {"column": 0, "row": 0, "lm_head": 0}
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, RowParallelLinear):
                setattr(module, name, InvariantRowLinear(child, matmul, tp))
                counts["row"] += 1
            elif isinstance(child, nn.Linear) and child is not getattr(model, "lm_head", None):
                if not isinstance(child, ColumnParallelLinear):
                    raise ConfigError(f"tp_invariant: {type(child).__name__} {name!r} is neither "
                                      "column- nor row-parallel; its numerics are unknown")
                setattr(module, name, InvariantLinear(child, matmul))
                counts["column"] += 1
    head = getattr(model, "lm_head", _MISSING)
    if head is _MISSING:
        raise ConfigError(f"tp_invariant: {type(model).__name__} has no lm_head attribute")
    model.lm_head = InvariantLinear(head, matmul, torch.float32,
                                    weight=None if head is not None
                                    else model.model.embed_tokens.weight)
    counts["lm_head"] = 1
    return counts
