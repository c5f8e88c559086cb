"""Tensor parallelism, framework-free: who a worker is in its group, and which slice it holds.

Every rank holds whole KV-head groups (one KV head and the query heads that share it), so
attention never crosses ranks. Groups, MLP channels and vocabulary rows are split as evenly as
possible, lower ranks taking one more where the count does not divide: 3 KV heads over 2
ranks give rank 0 two groups and rank 1 one. Uneven splits cost balance, not correctness.

The vocabulary is split into equal, padded shards instead (ceil(vocab / size) rows each, the
last rank's tail zero-filled): collectives that gather logits want equal sizes everywhere.

The executor checks a model fits before it starts a process (`check_model_fits`); the torch
models read their slices from `HeadShard`, `split_evenly` and `VocabShard`.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvport.core.config import ConfigError
from kvport.core.model_info import ModelInfo


@dataclass(frozen=True)
class TensorParallelRank:
    """One worker's place in its tensor-parallel group, handed to the worker it runs.

    init_method: where the ranks meet to build the group ("tcp://127.0.0.1:PORT").
    backend: the Platform's collective backend ("gloo", "nccl", ...).
    """
    rank: int = 0
    world_size: int = 1
    init_method: str = ""
    backend: str = ""

    @property
    def is_first(self) -> bool:
        """Rank 0 samples and answers for the group."""
        return self.rank == 0


SINGLE_RANK = TensorParallelRank()


def split_evenly(total: int, parts: int, index: int) -> tuple[int, int]:
    """(start, count) of part `index` when `total` items are split into `parts` contiguous
    parts as evenly as possible, the first `total % parts` parts taking one more."""
    if not 0 <= index < parts:
        raise ValueError(f"part {index} of {parts} does not exist")
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, base + (1 if index < extra else 0)


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one rank computes: whole KV-head groups."""
    q_start: int
    num_heads: int
    kv_start: int
    num_kv_heads: int

    @classmethod
    def of(cls, num_heads: int, num_kv_heads: int, world_size: int, rank: int) -> "HeadShard":
        group = num_heads // num_kv_heads                # query heads per KV head
        kv_start, kv_count = split_evenly(num_kv_heads, world_size, rank)
        return cls(q_start=kv_start * group, num_heads=kv_count * group,
                   kv_start=kv_start, num_kv_heads=kv_count)


@dataclass(frozen=True)
class VocabShard:
    """Vocabulary rows [start, start + count) of `padded` local rows (the rest are zero)."""
    start: int
    count: int
    padded: int

    @classmethod
    def of(cls, vocab_size: int, world_size: int, rank: int) -> "VocabShard":
        padded = -(-vocab_size // world_size)
        start = min(rank * padded, vocab_size)
        return cls(start=start, count=min(padded, vocab_size - start), padded=padded)


def check_model_fits(size: int, model_info: ModelInfo) -> None:
    """Raise ConfigError when `size` ranks cannot each hold a whole KV-head group."""
    heads, kv_heads = model_info.num_heads, model_info.num_kv_heads
    if heads % kv_heads:
        raise ConfigError(f"tensor_parallel_size {size}: the model's {heads} attention heads do "
                          f"not form equal groups over its {kv_heads} KV heads")
    if size > kv_heads:
        raise ConfigError(
            f"tensor_parallel_size {size} is larger than the model's {kv_heads} KV heads "
            f"({heads} attention heads): each rank must hold at least one KV head and its "
            f"query heads; use tensor_parallel_size <= {kv_heads}")
