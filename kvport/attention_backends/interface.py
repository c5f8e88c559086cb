"""The AttentionBackend interface and the per-step metadata every backend starts from.

Framework-neutral: arrays are whatever the backend's framework uses (torch tensors, jax
arrays). The model runner builds one `CommonAttentionMetadata` per step from plain numpy data;
the backend turns it into its own metadata once (`build_metadata`), and every layer's
`forward` reuses that.

Token layout of a step: the scheduled tokens of all requests, concatenated in batch order.
Request i owns tokens query_start_loc[i]:query_start_loc[i+1]; they are the last
`query_len` tokens of its context of `seq_lens[i]` tokens, so a decode step is a request whose
query_len is 1 and a prefill chunk one whose query_len is larger. No phases, one code path.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np


class UnsupportedAttentionConfig(ValueError):
    """A backend cannot serve this model/cache shape; the message says which value and why."""


@dataclass(frozen=True)
class AttentionSpec:
    """Constants of one model's attention, fixed for the engine's life."""
    num_heads: int
    num_kv_heads: int
    head_size: int
    block_size: int
    dtype: str                       # "float32", "bfloat16", "float16"
    scale: float
    sliding_window: int | None = None

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class CommonAttentionMetadata:
    """One step's attention inputs as plain numpy arrays (int32 unless said otherwise).

    query_start_loc: [num_reqs + 1] offsets of each request's tokens in the step.
    seq_lens: [num_reqs] context length of each request after this step's tokens.
    block_table: [num_reqs, max_blocks] physical block ids; entries past a request's last
        block are 0 and must not be read.
    slot_mapping: [num_tokens] int64 flat slot (block_id * block_size + offset) for the new
        key/value of each token.
    """
    query_start_loc: np.ndarray
    seq_lens: np.ndarray
    block_table: np.ndarray
    slot_mapping: np.ndarray

    @property
    def num_reqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    @property
    def query_lens(self) -> np.ndarray:
        return np.diff(self.query_start_loc)

    def decode_and_prefill_requests(self) -> tuple[np.ndarray, np.ndarray]:
        """Indices of the requests with one query token (decodes) and with more (prefill
        chunks): the two groups backends that batch by shape plan separately."""
        query_lens = self.query_lens
        return np.flatnonzero(query_lens == 1), np.flatnonzero(query_lens > 1)

    def padded_slot_mapping(self, num_padded: int, pad_slot: int | None) -> np.ndarray:
        """int64 slots for `num_padded` tokens: the step's own, then `pad_slot` (0 when None)
        for the padding tokens of a bucketed step."""
        slots = np.full(num_padded, pad_slot if pad_slot is not None else 0, np.int64)
        slots[:self.num_tokens] = self.slot_mapping
        return slots

    @property
    def max_query_len(self) -> int:
        return int(self.query_lens.max()) if self.num_reqs else 0

    @property
    def max_seq_len(self) -> int:
        return int(self.seq_lens.max()) if self.num_reqs else 0


class AttentionBackend(abc.ABC):
    """Paged attention for a mixed batch of prefill chunks and decode tokens.

    Subclasses set the class attributes and implement the three methods. The engine checks
    `validate_spec` before allocating anything, so an unsupported shape fails at start-up with
    the backend's own message instead of deep inside a kernel.
    """
    name: ClassVar[str] = ""
    supported_dtypes: ClassVar[tuple[str, ...]] = ("float32", "bfloat16", "float16")
    supported_head_sizes: ClassVar[tuple[int, ...] | None] = None   # None: any
    supported_block_sizes: ClassVar[tuple[int, ...] | None] = None  # None: any power of two
    supports_sliding_window: ClassVar[bool] = True

    def __init__(self, spec: AttentionSpec):
        self.validate_spec(spec)
        self.spec = spec

    @classmethod
    def validate_spec(cls, spec: AttentionSpec) -> None:
        """Raise UnsupportedAttentionConfig naming the first value this backend cannot serve."""
        if spec.dtype not in cls.supported_dtypes:
            raise UnsupportedAttentionConfig(
                f"attention backend {cls.name!r} does not support dtype {spec.dtype}; "
                f"supported: {', '.join(cls.supported_dtypes)}")
        if cls.supported_head_sizes is not None and spec.head_size not in cls.supported_head_sizes:
            raise UnsupportedAttentionConfig(
                f"attention backend {cls.name!r} does not support head size {spec.head_size}; "
                f"supported: {cls.supported_head_sizes}")
        if cls.supported_block_sizes is not None and spec.block_size not in cls.supported_block_sizes:
            raise UnsupportedAttentionConfig(
                f"attention backend {cls.name!r} does not support block size {spec.block_size}; "
                f"supported: {cls.supported_block_sizes}")
        if spec.num_heads % spec.num_kv_heads:
            raise UnsupportedAttentionConfig(
                f"num_heads {spec.num_heads} is not a multiple of num_kv_heads {spec.num_kv_heads}")
        if spec.sliding_window is not None and not cls.supports_sliding_window:
            raise UnsupportedAttentionConfig(
                f"attention backend {cls.name!r} does not support sliding-window attention")

    @staticmethod
    @abc.abstractmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                       head_size: int) -> tuple[int, ...]:
        """Shape of one layer's KV cache tensor (keys and values together)."""

    @classmethod
    def page_bytes(cls, block_size: int, num_kv_heads: int, head_size: int,
                   dtype_bytes: int) -> int:
        """Bytes one block occupies in one layer (keys and values)."""
        shape = cls.kv_cache_shape(1, block_size, num_kv_heads, head_size)
        return int(np.prod(shape)) * dtype_bytes

    @abc.abstractmethod
    def build_metadata(self, common: CommonAttentionMetadata, device: Any) -> Any:
        """Turn the step's plain metadata into this backend's own, on `device`. Once per step."""

    @abc.abstractmethod
    def forward(self, query: Any, key: Any, value: Any, kv_cache: Any, metadata: Any) -> Any:
        """Write this step's keys/values into their slots, then attend.

        query [num_tokens, num_heads, head_size]; key, value [num_tokens, num_kv_heads,
        head_size]; kv_cache as `kv_cache_shape` says. Every new key/value is written before
        any query attends, so requests in one step may read blocks another one fills (prefix
        sharing). Returns [num_tokens, num_heads * head_size] in the query's dtype: causal
        within each request, over its whole context, limited to the last `sliding_window`
        positions when the spec sets one.
        """
