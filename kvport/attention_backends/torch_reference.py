"""Paged attention in plain torch: the numerical reference every backend is checked against.

Clear over fast: one request at a time, float32 arithmetic whatever the cache dtype. Runs on any
torch device, so it is also the fallback a new platform starts from.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvport.attention_backends.interface import (AttentionBackend, AttentionSpec,
                                                 CommonAttentionMetadata)


@dataclass
class TorchPagedMetadata:
    """The common metadata as device tensors, plus host copies for the per-request loop."""
    slot_mapping: torch.Tensor        # [num_tokens] int64
    block_table: torch.Tensor         # [num_reqs, max_blocks] int64
    query_start_loc: np.ndarray       # host [num_reqs + 1]
    seq_lens: np.ndarray              # host [num_reqs]


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter this step's keys/values into their slots of a [2, blocks, bs, kvh, d] cache."""
    num_kv_heads, head_size = kv_cache.shape[-2:]
    kv_cache[0].view(-1, num_kv_heads, head_size).index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    kv_cache[1].view(-1, num_kv_heads, head_size).index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


def gather_context(kv_cache: torch.Tensor, block_ids: torch.Tensor,
                   seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [seq_len, kvh, d] of one request, read through its block table."""
    num_kv_heads, head_size = kv_cache.shape[-2:]
    keys = kv_cache[0, block_ids].reshape(-1, num_kv_heads, head_size)[:seq_len]
    values = kv_cache[1, block_ids].reshape(-1, num_kv_heads, head_size)[:seq_len]
    return keys, values


def causal_mask(query_len: int, seq_len: int, sliding_window: int | None,
                device: torch.device) -> torch.Tensor:
    """[query_len, seq_len] True where a query may attend: the queries are the last positions."""
    q_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


class TorchReferenceBackend(AttentionBackend):
    """Reference paged attention: per request, gather its context and attend in float32."""
    name = "torch_reference"

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                       head_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    def build_metadata(self, common: CommonAttentionMetadata, device) -> TorchPagedMetadata:
        return TorchPagedMetadata(
            slot_mapping=torch.from_numpy(common.slot_mapping.astype(np.int64)).to(device),
            block_table=torch.from_numpy(common.block_table.astype(np.int64)).to(device),
            query_start_loc=common.query_start_loc, seq_lens=common.seq_lens)

    def forward(self, query, key, value, kv_cache, metadata: TorchPagedMetadata):
        write_kv(kv_cache, key, value, metadata.slot_mapping)
        spec: AttentionSpec = self.spec
        out = torch.empty(query.shape[0], spec.num_heads, spec.head_size,
                          dtype=query.dtype, device=query.device)
        for i, seq_len in enumerate(metadata.seq_lens.tolist()):
            start, end = int(metadata.query_start_loc[i]), int(metadata.query_start_loc[i + 1])
            num_blocks = -(-seq_len // spec.block_size)
            keys, values = gather_context(kv_cache, metadata.block_table[i, :num_blocks], seq_len)
            out[start:end] = self._attend(query[start:end], keys, values, seq_len)
        return out.view(query.shape[0], spec.num_heads * spec.head_size)

    def _attend(self, query, keys, values, seq_len: int) -> torch.Tensor:
        spec = self.spec
        query_len, group = query.shape[0], spec.num_queries_per_kv
        # [kvh, group, q, d] x [kvh, d, s] -> [kvh, group, q, s]
        q = query.float().view(query_len, spec.num_kv_heads, group, spec.head_size).permute(1, 2, 0, 3)
        k = keys.float().permute(1, 2, 0).unsqueeze(1)
        scores = torch.matmul(q, k) * spec.scale
        mask = causal_mask(query_len, seq_len, spec.sliding_window, query.device)
        scores.masked_fill_(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        v = values.float().permute(1, 0, 2).unsqueeze(1)          # [kvh, 1, s, d]
        out = torch.matmul(probs, v)                                # [kvh, group, q, d]
        return out.permute(2, 0, 1, 3).reshape(query_len, spec.num_heads, spec.head_size).to(query.dtype)
