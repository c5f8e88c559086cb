"""Layers that hold one rank's slice of a weight, and load that slice from the full checkpoint.

    ColumnParallelLinear    rows of W (output features), in fused segments (q|k|v, gate|up);
                            the output stays split: the next layer consumes this rank's part
    RowParallelLinear       columns of W (input features); partial products are summed over
                            the ranks (all-reduce), then the bias is added once
    VocabParallelEmbedding  rows of the embedding; a token outside this rank's rows looks up
                            zeros, and the all-reduce fills in the rank that has it
    ParallelLMHead          rows of the LM head; the model gathers the logits on rank 0

Each is an nn.Linear / nn.Embedding of the local shape, so with one rank it computes exactly
what the plain module did (no collective is called), and int8 quantization, which replaces
nn.Linear modules, still finds them. `load_shard(name, full_tensor, shard_id)` takes the full
checkpoint tensor (on the CPU) and copies only this rank's part to the device.

None of them draws random initial weights: every parameter comes from the checkpoint
(`load_weights` refuses one that leaves any unset), and the random init on the meta device
cost seconds per process (it imports torch._dynamo).
"""
from __future__ import annotations

from typing import Any, Hashable

import torch
import torch.nn.functional as F
from torch import nn

from kvport.core.tensor_parallel import VocabShard
from kvport.models.tp_group import SINGLE_GROUP, TensorParallelGroup
from kvport.models.weights import WeightLoadError


def _check_shape(tensor: torch.Tensor, full_shape: tuple[int, ...], name: str) -> None:
    """The checkpoint tensor must have the unsharded shape, before any slice is taken."""
    if tuple(tensor.shape) != tuple(full_shape):
        raise WeightLoadError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                              f"the model expects {tuple(full_shape)}")


class _LoadedOnly:
    """Mixin: parameters are left uninitialized until `load_shard` fills them."""

    def reset_parameters(self) -> None:
        """No random init (see the module docstring)."""


class ColumnParallelLinear(_LoadedOnly, nn.Linear):
    """y_r = x W_r^T + b_r, W_r this rank's rows of each segment of a fused projection.

    segments: shard id -> (full rows in the checkpoint, first row this rank takes, rows it
    takes), in the order they are stacked locally; shard id None for an unfused projection.
    """

    def __init__(self, in_features: int, segments: dict[Hashable, tuple[int, int, int]],
                 bias: bool):
        self.segments = dict(segments)
        self.offsets: dict[Hashable, int] = {}
        local = 0
        for shard_id, (_, _, rows) in self.segments.items():
            self.offsets[shard_id] = local
            local += rows
        super().__init__(in_features, local, bias=bias)

    def load_shard(self, name: str, tensor: torch.Tensor, shard_id: Hashable,
                   hf_name: str) -> None:
        """Copy this rank's rows of the checkpoint tensor `hf_name` (segment `shard_id`)."""
        full_rows, start, rows = self.segments[shard_id]
        param = getattr(self, name).data
        _check_shape(tensor, (full_rows, *param.shape[1:]), hf_name)
        param.narrow(0, self.offsets[shard_id], rows).copy_(tensor.narrow(0, start, rows))


class RowParallelLinear(_LoadedOnly, nn.Linear):
    """y = sum over ranks of x_r W_r^T, plus b: W_r this rank's columns [start, start + count)
    of W [out, full_in]; x_r the matching slice of the input, which a column-parallel layer
    (or attention over this rank's heads) produced."""

    def __init__(self, full_in_features: int, start: int, count: int, out_features: int,
                 bias: bool, tp: TensorParallelGroup = SINGLE_GROUP):
        super().__init__(count, out_features, bias=bias)
        self.full_in_features, self.start = full_in_features, start
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return super().forward(x)
        if self.tp.reduce_in_float32 and x.dtype != torch.float32:
            # The partial products stay float32 until the sum is complete, so the result is
            # rounded once, as the unsharded matmul rounds it (docs/distributed.md).
            y = self.tp.all_reduce(linear_float32_output(x, self.weight))
            y = y if self.bias is None else y + self.bias.float()
            return y.to(x.dtype)
        y = self.tp.linear_all_reduce(x, self.weight)
        return y if self.bias is None else y + self.bias

    def load_shard(self, name: str, tensor: torch.Tensor, shard_id: Any, hf_name: str) -> None:
        """The weight's columns of this rank; the bias (replicated) whole."""
        param = getattr(self, name).data
        if name == "bias":
            _check_shape(tensor, param.shape, hf_name)
            param.copy_(tensor)
            return
        _check_shape(tensor, (param.shape[0], self.full_in_features), hf_name)
        param.copy_(tensor.narrow(1, self.start, param.shape[1]))


def linear_float32_output(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T with the float32 accumulator as output (not rounded to x's dtype): cuBLAS does
    it in one matmul (torch.mm's out_dtype); elsewhere the operands are widened first."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.is_cuda:
        out = torch.mm(flat, weight.t(), torch.float32)
    else:
        out = torch.mm(flat.float(), weight.t().float())
    return out.view(*x.shape[:-1], weight.shape[0])


def _load_vocab_rows(param: torch.Tensor, tensor: torch.Tensor, shard: VocabShard,
                     vocab_size: int, hf_name: str) -> None:
    """Rows [start, start + count) of the checkpoint's [vocab, hidden] tensor; padding zeros."""
    _check_shape(tensor, (vocab_size, *param.shape[1:]), hf_name)
    param.narrow(0, 0, shard.count).copy_(tensor.narrow(0, shard.start, shard.count))
    param.narrow(0, shard.count, shard.padded - shard.count).zero_()


class VocabParallelEmbedding(_LoadedOnly, nn.Embedding):
    """Embedding rows of this rank's vocabulary shard, combined over ranks by an all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int,
                 tp: TensorParallelGroup = SINGLE_GROUP):
        self.shard = VocabShard.of(vocab_size, tp.world_size, tp.rank)
        super().__init__(self.shard.padded, hidden_size)
        self.vocab_size, self.tp = vocab_size, tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return super().forward(input_ids)
        local = input_ids - self.shard.start
        outside = (local < 0) | (local >= self.shard.count)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)      # [T, hidden]
        return self.tp.all_reduce(x.masked_fill_(outside.unsqueeze(-1), 0))

    def load_shard(self, name: str, tensor: torch.Tensor, shard_id: Any, hf_name: str) -> None:
        """This rank's vocabulary rows."""
        _load_vocab_rows(self.weight.data, tensor, self.shard, self.vocab_size, hf_name)


class ParallelLMHead(_LoadedOnly, nn.Linear):
    """LM head rows of this rank's vocabulary shard: local logits [N, padded shard]."""

    def __init__(self, hidden_size: int, vocab_size: int,
                 tp: TensorParallelGroup = SINGLE_GROUP):
        self.shard = VocabShard.of(vocab_size, tp.world_size, tp.rank)
        super().__init__(hidden_size, self.shard.padded, bias=False)
        self.vocab_size = vocab_size

    def load_shard(self, name: str, tensor: torch.Tensor, shard_id: Any, hf_name: str) -> None:
        """This rank's vocabulary rows."""
        _load_vocab_rows(self.weight.data, tensor, self.shard, self.vocab_size, hf_name)
