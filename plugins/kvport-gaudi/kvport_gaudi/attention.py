"""hpu_flat: paged attention in the form Gaudi's graph compiler favours.

Static shapes (every padded size comes from a bucket, kvport_gaudi/buckets.py), matrix
multiplies for the MME engines, elementwise work and reductions for the TPC cores, and no
data-dependent control flow. A step is two fixed-shape parts (kvport_gaudi/plan.py):

* decode requests, flat: the blocks of every request in one list; each block gets its
  request's query by `block_mapping @ q` (a one-hot matmul, not a gather), scores against its
  own keys by a batched matmul, and a per-block softmax (block max, exp, block sum, block
  output). The blocks of a request are merged into its softmax by matmuls with the mapping:

      c   = M (M^T (w * m))                         mean of the request's block maxima
      c'  = c + t * log(M (M^T (w * exp((m - c) / t))))   a smoothed max, c' <= max
      out = M^T (exp(s - c') V)  /  M^T (sum exp(s - c'))

  where m is each block's max, w its weight (1 / blocks of its request) and t = 4. Every
  shift is exact algebra (softmax does not depend on it); c' only keeps exp() in range: it is
  at most the request's true max (so the denominator is >= 1) and at least that max minus
  t * log(blocks) (36 at 8192 blocks). Both exponents are clamped (at 80 and 60), which never
  binds while a request's block maxima lie within 320 of each other; past that the clamp
  keeps every number finite, so that request's result is off but no inf reaches the matmuls,
  where 0 * inf would turn every other request of the step into NaN.
* prefill chunks, padded: [P, Q] queries against [P, B * bs] gathered context keys with a
  bias mask (causal, sliding window, padding), one softmax.

Keys and values are written into their slots before either part reads (prefix sharing within
a step). The cache layout is the reference's, [2, blocks, block_size, kv_heads, head_size].
Scores and softmax statistics are float32; the products with V run in the cache dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvport.attention_backends.interface import AttentionBackend, CommonAttentionMetadata
from kvport_gaudi.buckets import GaudiBuckets
from kvport_gaudi.plan import plan_decode, plan_prefill

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOOTH_MAX_TEMPERATURE = 4.0
MAX_SMOOTHING_EXPONENT = 80.0     # e^80 x 1 stays finite in float32 (weights sum to 1)
MAX_SCORE_EXPONENT = 60.0         # e^60 x 2^17 keys per request stays finite
TINY = torch.finfo(torch.float32).tiny


@dataclass
class FlatDecode:
    q_rows: torch.Tensor         # [S]
    out_rows: torch.Tensor       # [S]
    block_list: torch.Tensor     # [NB]
    mapping: torch.Tensor        # [NB, S] float32
    mapping_kv: torch.Tensor     # [NB, S] in the cache dtype (broadcasts queries exactly)
    bias: torch.Tensor           # [NB, 1, 1, bs] float32
    weight: torch.Tensor         # [NB, 1] float32


@dataclass
class PaddedPrefill:
    q_rows: torch.Tensor         # [P * Q]
    out_rows: torch.Tensor       # [P * Q]
    block_ids: torch.Tensor      # [P * B]
    bias: torch.Tensor           # [P, 1, 1, Q, B * bs] float32
    num_seqs: int
    query_len: int
    num_blocks: int


@dataclass
class GaudiMetadata:
    slot_mapping: torch.Tensor   # [num_padded_tokens] int64
    num_tokens: int              # real tokens of the step
    num_padded_tokens: int       # what the model runs (== num_tokens without token padding)
    decode: FlatDecode | None
    prefill: PaddedPrefill | None

    def shape_key(self) -> tuple[int, ...]:
        """The padded sizes the step's graph depends on (one compilation per distinct key)."""
        d, p = self.decode, self.prefill
        return (self.num_padded_tokens,
                *(tuple(d.mapping.shape) if d else (0, 0)),
                *((p.num_seqs, p.query_len, p.num_blocks) if p else (0, 0, 0)))


class GaudiPagedBackend(AttentionBackend):
    """Flat decode + padded prefill paged attention with bucketed shapes."""
    name = "hpu_flat"

    def __init__(self, spec, buckets: GaudiBuckets | None = None):
        super().__init__(spec)
        self.buckets = buckets or GaudiBuckets()
        self.dtype = TORCH_DTYPES[spec.dtype]
        self.pad_slot: int | None = None

    def enable_token_padding(self, pad_slot: int) -> None:
        """Pad every step's tokens to the `tokens` bucket. The model then runs the padded
        count (metadata.num_padded_tokens); padding tokens write their keys and values into
        `pad_slot`, a slot the worker keeps out of the cache manager's hands, and their
        output rows are zeros."""
        self.pad_slot = int(pad_slot)

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                       head_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    # Once per step ---------------------------------------------------------------------
    def build_metadata(self, common: CommonAttentionMetadata, device) -> GaudiMetadata:
        spec, buckets = self.spec, self.buckets
        T = common.num_tokens
        padded = T if self.pad_slot is None else buckets.tokens(T)
        slots = common.padded_slot_mapping(padded, self.pad_slot)
        qsl = common.query_start_loc.astype(np.int64)
        args = (qsl, common.seq_lens, common.block_table, spec.block_size, spec.sliding_window,
                buckets, padded)                               # row `padded`: the dummy row
        decode_reqs, prefill_reqs = common.decode_and_prefill_requests()
        decode = plan_decode(decode_reqs, *args) if decode_reqs.size else None
        prefill = plan_prefill(prefill_reqs, *args) if prefill_reqs.size else None

        def tensor(array, dtype=None):
            return torch.from_numpy(array).to(device=device, dtype=dtype)

        flat = None
        if decode is not None:
            mapping = tensor(decode.block_mapping)
            flat = FlatDecode(tensor(decode.q_rows), tensor(decode.out_rows),
                              tensor(decode.block_list), mapping, mapping.to(self.dtype),
                              tensor(decode.block_bias)[:, None, None, :],
                              tensor(decode.block_weight)[:, None])
        padded_prefill = None
        if prefill is not None:
            padded_prefill = PaddedPrefill(
                tensor(prefill.q_rows), tensor(prefill.out_rows), tensor(prefill.block_ids),
                tensor(prefill.bias)[:, None, None], prefill.num_seqs, prefill.query_len,
                prefill.num_blocks)
        return GaudiMetadata(tensor(slots), T, padded, flat, padded_prefill)

    # Per layer -------------------------------------------------------------------------
    def forward(self, query, key, value, kv_cache, metadata: GaudiMetadata):
        spec = self.spec
        rows = query.shape[0]
        if rows != metadata.num_padded_tokens:
            raise ValueError(f"{self.name}: the model ran {rows} tokens but the step's metadata "
                             f"has {metadata.num_padded_tokens} (padded from "
                             f"{metadata.num_tokens})")
        kvh, d = spec.num_kv_heads, spec.head_size
        kv_cache[0].view(-1, kvh, d).index_copy_(0, metadata.slot_mapping,
                                                 key.to(kv_cache.dtype))
        kv_cache[1].view(-1, kvh, d).index_copy_(0, metadata.slot_mapping,
                                                 value.to(kv_cache.dtype))
        # One extra row receives every padding row's output and is dropped.
        out = torch.zeros(rows + 1, spec.num_heads * d, dtype=query.dtype, device=query.device)
        q = query.to(kv_cache.dtype)
        if metadata.decode is not None:
            part = metadata.decode
            out.index_copy_(0, part.out_rows, self._flat_decode(q, kv_cache, part).to(out.dtype))
        if metadata.prefill is not None:
            part = metadata.prefill
            out.index_copy_(0, part.out_rows, self._prefill(q, kv_cache, part).to(out.dtype))
        return out[:rows]

    def _flat_decode(self, q_all: torch.Tensor, kv_cache: torch.Tensor,
                     part: FlatDecode) -> torch.Tensor:
        """[S, H * d]: one query per request against the flat block list."""
        spec = self.spec
        kvh, G, d = spec.num_kv_heads, spec.num_queries_per_kv, spec.head_size
        NB, S = part.mapping.shape
        q = q_all.index_select(0, part.q_rows).reshape(S, -1) * spec.scale
        q = (part.mapping_kv @ q).view(NB, kvh, G, d)                  # batch to blocks
        keys = kv_cache[0].index_select(0, part.block_list)            # [NB, bs, kvh, d]
        values = kv_cache[1].index_select(0, part.block_list)
        scores = torch.matmul(q, keys.permute(0, 2, 3, 1)).float() + part.bias  # [NB,kvh,G,bs]

        block_max = scores.amax(-1).view(NB, -1)                       # [NB, kvh * G]
        block_max = torch.where(part.weight > 0, block_max, 0.0)       # padding entries: 0
        M, w, t = part.mapping, part.weight, SMOOTH_MAX_TEMPERATURE
        center = M.t() @ (w * block_max)                               # [S, kvh * G]
        spread = M.t() @ (w * torch.exp(((block_max - M @ center) / t)
                                         .clamp_max(MAX_SMOOTHING_EXPONENT)))
        shift = M @ (center + t * torch.log(spread.clamp_min(TINY)))   # batch to blocks

        probs = torch.exp((scores - shift.view(NB, kvh, G, 1)).clamp_max(MAX_SCORE_EXPONENT))
        block_sum = probs.sum(-1).view(NB, -1)                         # [NB, kvh * G]
        block_out = torch.matmul(probs.to(values.dtype), values.permute(0, 2, 1, 3))
        numerator = M.t() @ block_out.float().view(NB, -1)             # blocks to batch
        denominator = M.t() @ block_sum
        out = numerator.view(S, kvh * G, d) / denominator.clamp_min(TINY).unsqueeze(-1)
        return out.view(S, spec.num_heads * d)

    def _prefill(self, q_all: torch.Tensor, kv_cache: torch.Tensor,
                 part: PaddedPrefill) -> torch.Tensor:
        """[P * Q, H * d]: padded query chunks against their gathered context."""
        spec = self.spec
        kvh, G, d, bs = spec.num_kv_heads, spec.num_queries_per_kv, spec.head_size, spec.block_size
        P, Q, B = part.num_seqs, part.query_len, part.num_blocks
        q = q_all.index_select(0, part.q_rows).view(P, Q, kvh, G, d) * spec.scale
        q = q.permute(0, 2, 3, 1, 4).reshape(P, kvh, G * Q, d)
        keys = kv_cache[0].index_select(0, part.block_ids).view(P, B * bs, kvh, d)
        values = kv_cache[1].index_select(0, part.block_ids).view(P, B * bs, kvh, d)
        scores = torch.matmul(q, keys.permute(0, 2, 3, 1)).float()     # [P, kvh, G*Q, L]
        scores = scores.view(P, kvh, G, Q, B * bs) + part.bias
        probs = torch.softmax(scores, dim=-1).view(P, kvh, G * Q, B * bs)
        out = torch.matmul(probs.to(values.dtype), values.permute(0, 2, 1, 3))
        return out.view(P, kvh, G, Q, d).permute(0, 3, 1, 2, 4).reshape(P * Q, -1)
