"""cpu_sdpa: paged attention on torch's scaled_dot_product_attention.

It keeps the reference backend's KV cache layout ([2, blocks, block_size, kv_heads,
head_size]) and its slot writes, and computes each request's attention with one SDPA call
over its gathered context: GQA through `enable_gqa`, causal masking and the sliding window
through a boolean mask (none at all for a plain decode, where every cached position is
visible).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kvport.attention_backends.interface import AttentionBackend, CommonAttentionMetadata
from kvport.attention_backends.torch_reference import (TorchPagedMetadata, causal_mask,
                                                       gather_context, write_kv)


class SdpaAttentionBackend(AttentionBackend):
    name = "cpu_sdpa"

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                       head_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    def build_metadata(self, common: CommonAttentionMetadata, device) -> TorchPagedMetadata:
        return TorchPagedMetadata(
            slot_mapping=torch.from_numpy(common.slot_mapping).to(device, torch.int64),
            block_table=torch.from_numpy(common.block_table).to(device, torch.int64),
            query_start_loc=common.query_start_loc, seq_lens=common.seq_lens)

    def forward(self, query, key, value, kv_cache, metadata: TorchPagedMetadata):
        write_kv(kv_cache, key, value, metadata.slot_mapping)   # every write before any read
        spec = self.spec
        out = torch.empty(query.shape[0], spec.num_heads * spec.head_size, dtype=query.dtype,
                          device=query.device)
        qsl = metadata.query_start_loc.tolist()
        for i, seq_len in enumerate(metadata.seq_lens.tolist()):
            start, end = qsl[i], qsl[i + 1]
            num_blocks = -(-seq_len // spec.block_size)
            keys, values = gather_context(kv_cache, metadata.block_table[i, :num_blocks], seq_len)
            out[start:end] = self._attend(query[start:end], keys, values, seq_len)
        return out

    def _attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                seq_len: int) -> torch.Tensor:
        """query [q, H, D]; keys, values [s, KV, D] -> [q, H * D]."""
        spec = self.spec
        query_len = query.shape[0]
        window_cuts = spec.sliding_window is not None and seq_len > spec.sliding_window
        mask = None
        if query_len > 1 or window_cuts:
            mask = causal_mask(query_len, seq_len, spec.sliding_window, query.device)
        q = query.transpose(0, 1).unsqueeze(0)                        # [1, H, q, D]
        k = keys.to(query.dtype).transpose(0, 1).unsqueeze(0)         # [1, KV, s, D]
        v = values.to(query.dtype).transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=spec.scale,
                                             enable_gqa=spec.num_heads != spec.num_kv_heads)
        return out[0].transpose(0, 1).reshape(query_len, spec.num_heads * spec.head_size)
