"""mps_sdpa: paged attention as at most two scaled_dot_product_attention calls per step.

On Apple GPUs every kernel launch is an encoded Metal command; a step that loops over its
requests in Python pays that cost per request and per layer. This backend plans the step
once (`build_metadata`, numpy) into two padded batches and then, per layer, runs one gather
and one SDPA for each:

* decodes (one new token): [D, kv_heads, G, d] queries, the G query heads that share a KV
  head folded into SDPA's query-length axis (no K/V repeat), against [D, kv_heads, L, d]
  keys/values gathered with one index_select of a [D, B] block table;
* prefill chunks (several new tokens): [P, kv_heads, G * Q, d] against [P, kv_heads, L, d],
  with a boolean mask per query row (causal, sliding window, padding).

Masks are boolean (True: attend), built once per step. Padding rows attend to one slot so
SDPA never sees an all-False row (which gives NaN), and are never written back; padding
block-table entries repeat a block the request reads anyway. KV layout is the reference's,
[2, blocks, block_size, kv_heads, head_size]. Float64 never reaches MPS (capabilities.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kvport.attention_backends.interface import AttentionBackend, CommonAttentionMetadata


@dataclass
class SdpaBatch:
    """One padded batch: R requests x Q query rows x B blocks."""
    q_rows: torch.Tensor        # [R * Q] int64 token rows (padding: 0)
    out_rows: torch.Tensor      # [R * Q] int64 output rows (padding: the dummy row)
    block_ids: torch.Tensor     # [R * B] int64
    mask: torch.Tensor          # [R, 1, G * Q, B * bs] bool
    num_reqs: int
    query_len: int
    num_blocks: int


@dataclass
class MpsSdpaMetadata:
    slot_mapping: torch.Tensor  # [T] int64
    decode: SdpaBatch | None
    prefill: SdpaBatch | None


def plan_batch(reqs: np.ndarray, qsl: np.ndarray, seq_lens: np.ndarray,
               block_table: np.ndarray, block_size: int, window: int | None, group: int,
               dummy_row: int) -> dict:
    """Numpy arrays of one padded batch of the requests `reqs`."""
    bs = block_size
    lens = seq_lens[reqs].astype(np.int64)
    q_lens = (qsl[reqs + 1] - qsl[reqs]).astype(np.int64)
    first = np.zeros_like(lens) if window is None else np.maximum(lens - q_lens - window + 1, 0)
    start, count = first // bs, -(-lens // bs) - first // bs
    R, Q, B = len(reqs), int(q_lens.max()), int(count.max())
    offsets = np.minimum(np.arange(B)[None, :], count[:, None] - 1)     # repeat the last block
    block_ids = np.take_along_axis(block_table[reqs].astype(np.int64), start[:, None] + offsets,
                                   axis=1)
    row = np.arange(Q)[None, :]
    real = row < q_lens[:, None]                                         # [R, Q]
    q_rows = np.where(real, qsl[reqs, None] + row, 0)
    out_rows = np.where(real, q_rows, dummy_row)
    q_pos = (lens - q_lens)[:, None, None] + row[:, :, None]             # [R, Q, 1]
    k_pos = (start * bs)[:, None, None] + np.arange(B * bs)[None, None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    mask &= real[:, :, None]
    mask[:, :, 0] |= ~real                                               # padding rows: one slot
    mask = np.repeat(mask[:, None], group, axis=1).reshape(R, 1, group * Q, B * bs)
    return dict(q_rows=q_rows.reshape(-1), out_rows=out_rows.reshape(-1),
                block_ids=block_ids.reshape(-1), mask=mask, num_reqs=R, query_len=Q,
                num_blocks=B)


class MpsSdpaBackend(AttentionBackend):
    """Batched SDPA paged attention: one call for the decodes, one for the prefill chunks."""
    name = "mps_sdpa"

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                       head_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    def build_metadata(self, common: CommonAttentionMetadata, device) -> MpsSdpaMetadata:
        spec = self.spec
        qsl = common.query_start_loc.astype(np.int64)
        batches = []
        for reqs in common.decode_and_prefill_requests():
            if not reqs.size:
                batches.append(None)
                continue
            plan = plan_batch(reqs, qsl, common.seq_lens, common.block_table, spec.block_size,
                              spec.sliding_window, spec.num_queries_per_kv, common.num_tokens)
            batches.append(SdpaBatch(
                **{k: torch.from_numpy(v).to(device) for k, v in plan.items()
                   if isinstance(v, np.ndarray)},
                num_reqs=plan["num_reqs"], query_len=plan["query_len"],
                num_blocks=plan["num_blocks"]))
        slots = torch.from_numpy(common.slot_mapping.astype(np.int64)).to(device)
        return MpsSdpaMetadata(slots, *batches)

    def forward(self, query, key, value, kv_cache, metadata: MpsSdpaMetadata):
        spec = self.spec
        kvh, d = spec.num_kv_heads, spec.head_size
        kv_cache[0].view(-1, kvh, d).index_copy_(0, metadata.slot_mapping, key.to(kv_cache.dtype))
        kv_cache[1].view(-1, kvh, d).index_copy_(0, metadata.slot_mapping,
                                                 value.to(kv_cache.dtype))
        T = query.shape[0]
        out = torch.zeros(T + 1, spec.num_heads * d, dtype=query.dtype, device=query.device)
        q_all = query.to(kv_cache.dtype)
        for batch in (metadata.decode, metadata.prefill):
            if batch is not None:
                out.index_copy_(0, batch.out_rows, self._attend(q_all, kv_cache, batch)
                                .to(out.dtype))
        return out[:T]

    def _attend(self, q_all: torch.Tensor, kv_cache: torch.Tensor,
                batch: SdpaBatch) -> torch.Tensor:
        """[R * Q, H * d] for one padded batch."""
        spec = self.spec
        kvh, G, d, bs = spec.num_kv_heads, spec.num_queries_per_kv, spec.head_size, spec.block_size
        R, Q, B = batch.num_reqs, batch.query_len, batch.num_blocks
        q = q_all.index_select(0, batch.q_rows).view(R, Q, kvh, G, d)
        q = q.permute(0, 2, 3, 1, 4).reshape(R, kvh, G * Q, d)           # rows: (g, q)
        k = kv_cache[0].index_select(0, batch.block_ids).view(R, B * bs, kvh, d).transpose(1, 2)
        v = kv_cache[1].index_select(0, batch.block_ids).view(R, B * bs, kvh, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.mask, scale=spec.scale)
        return o.view(R, kvh, G, Q, d).permute(0, 3, 1, 2, 4).reshape(R * Q, spec.num_heads * d)
