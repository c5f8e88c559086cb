"""neuron_paged: paged attention split the way Neuron's NKI kernels split it, with static
shape buckets (kvport_neuron/buckets.py; the plan is kvport_neuron/plan.py).

Each step is at most two padded batches, decodes ([S, 1] queries) and prefill chunks
([S, Q] queries), and each batch is two attention parts merged by their softmax statistics:

    prior   queries against the context cached before this step, read through the padded
            block table: (acc1, m1, l1) = (sum exp(s - m1) v, max s, sum exp(s - m1))
    active  queries against the step's own new keys/values of the sequence (causal)
    merge   m = max(m1, m2);  out = (acc1 e^(m1 - m) + acc2 e^(m2 - m)) / (l1 e^(m1 - m) + ...)

The prior part of the decode batch runs as an NKI kernel (kvport_neuron/nki_decode.py) when
neuronxcc is importable and the shapes fit its tiles, and as torch otherwise; everything else
is torch. Neither has run on Neuron hardware; the NKI kernel has never been compiled.
Every key and value is written into its cache slot before any part reads, so a request may
read blocks another one fills in the same step. Scores and statistics are float32.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

import numpy as np
import torch

from kvport.attention_backends.interface import AttentionBackend, CommonAttentionMetadata
from kvport_neuron.buckets import MASKED, NeuronBuckets
from kvport_neuron.plan import plan_batch

NKI_TILE = 128      # keys per NKI tile: the partition dimension of the P @ V contraction


@dataclass
class NeuronBatch:
    q_rows: torch.Tensor         # [S * Q]
    out_rows: torch.Tensor       # [S * Q]
    block_ids: torch.Tensor      # [S * B]
    prior_mask: torch.Tensor     # [S, 1, 1, Q, B * bs] bool
    active_mask: torch.Tensor    # [S, 1, 1, Q, Q] bool
    num_seqs: int
    query_len: int
    num_blocks: int


@dataclass
class NeuronMetadata:
    slot_mapping: torch.Tensor   # [num_padded_tokens] int64
    num_tokens: int
    num_padded_tokens: int
    decode: NeuronBatch | None
    prefill: NeuronBatch | None

    def shape_key(self) -> tuple[int, ...]:
        """The padded sizes the step's graph depends on (one compilation per distinct key)."""
        sizes = [self.num_padded_tokens]
        for batch in (self.decode, self.prefill):
            sizes += ([batch.num_seqs, batch.query_len, batch.num_blocks] if batch
                      else [0, 0, 0])
        return tuple(sizes)


def nki_kernel():
    """The NKI decode kernel when neuronxcc is importable, else None."""
    if importlib.util.find_spec("neuronxcc") is None:
        return None
    return importlib.import_module("kvport_neuron.nki_decode").prior_decode_kernel


def torch_prior(q, k, v, bias):
    """The prior part in torch. q [S, kvh, R, d] (scaled); k, v [S, kvh, L, d]; bias
    [S, 1, R, L] float32 (0 / MASKED). Returns acc [S, kvh, R, d], m and l [S, kvh, R, 1]."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() + bias
    m = scores.amax(-1, keepdim=True)
    p = torch.exp(scores - m)
    acc = torch.matmul(p.to(v.dtype), v).float()
    return acc, m, p.sum(-1, keepdim=True)


class NeuronPagedBackend(AttentionBackend):
    """Bucketed prior/active paged attention for Neuron devices."""
    name = "neuron_paged"

    def __init__(self, spec, buckets: NeuronBuckets | None = None):
        super().__init__(spec)
        self.buckets = buckets or NeuronBuckets()
        self.pad_slot: int | None = None
        self.nki = nki_kernel()

    def enable_token_padding(self, pad_slot: int) -> None:
        """Pad every step's tokens to the tokens bucket (see buckets.py); padding tokens
        write into `pad_slot`, a slot the worker keeps out of the cache manager's hands."""
        self.pad_slot = int(pad_slot)

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                       head_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    # Once per step ---------------------------------------------------------------------
    def build_metadata(self, common: CommonAttentionMetadata, device) -> NeuronMetadata:
        spec = self.spec
        T = common.num_tokens
        padded = T if self.pad_slot is None else self.buckets.tokens(T)
        slots = common.padded_slot_mapping(padded, self.pad_slot)
        qsl = common.query_start_loc.astype(np.int64)
        batches = []
        for reqs in common.decode_and_prefill_requests():
            if not reqs.size:
                batches.append(None)
                continue
            plan = plan_batch(reqs, qsl, common.seq_lens, common.block_table, spec.block_size,
                              spec.sliding_window, self.buckets, padded)
            batches.append(NeuronBatch(
                torch.from_numpy(plan.q_rows).to(device),
                torch.from_numpy(plan.out_rows).to(device),
                torch.from_numpy(plan.block_ids).to(device),
                torch.from_numpy(plan.prior_mask).to(device)[:, None, None],
                torch.from_numpy(plan.active_mask).to(device)[:, None, None],
                plan.num_seqs, plan.query_len, plan.num_blocks))
        return NeuronMetadata(torch.from_numpy(slots).to(device), T, padded, *batches)

    # Per layer -------------------------------------------------------------------------
    def forward(self, query, key, value, kv_cache, metadata: NeuronMetadata):
        spec = self.spec
        rows = query.shape[0]
        if rows != metadata.num_padded_tokens:
            raise ValueError(f"{self.name}: the model ran {rows} tokens but the step's metadata "
                             f"has {metadata.num_padded_tokens} (padded from "
                             f"{metadata.num_tokens})")
        kvh, d = spec.num_kv_heads, spec.head_size
        key_c, value_c = key.to(kv_cache.dtype), value.to(kv_cache.dtype)
        kv_cache[0].view(-1, kvh, d).index_copy_(0, metadata.slot_mapping, key_c)
        kv_cache[1].view(-1, kvh, d).index_copy_(0, metadata.slot_mapping, value_c)
        out = torch.zeros(rows + 1, spec.num_heads * d, dtype=query.dtype, device=query.device)
        q_all = query.to(kv_cache.dtype)
        for batch, is_decode in ((metadata.decode, True), (metadata.prefill, False)):
            if batch is not None:
                o = self._batch(q_all, key_c, value_c, kv_cache, batch, is_decode)
                out.index_copy_(0, batch.out_rows, o.to(out.dtype))
        return out[:rows]

    def _batch(self, q_all, key, value, kv_cache, batch: NeuronBatch,
               is_decode: bool) -> torch.Tensor:
        """[S * Q, H * d] for one padded batch."""
        spec = self.spec
        kvh, G, d, bs = spec.num_kv_heads, spec.num_queries_per_kv, spec.head_size, spec.block_size
        S, Q, B = batch.num_seqs, batch.query_len, batch.num_blocks
        R = G * Q                                                   # query rows per KV head

        def per_sequence(x, length):       # [S * length, kvh, d] -> [S, kvh, length, d]
            return x.view(S, length, kvh, d).transpose(1, 2)

        q = q_all.index_select(0, batch.q_rows).view(S, Q, kvh, G, d) * spec.scale
        q = q.permute(0, 2, 3, 1, 4).reshape(S, kvh, R, d)          # rows: (g, q)
        k1 = per_sequence(kv_cache[0].index_select(0, batch.block_ids), B * bs)
        v1 = per_sequence(kv_cache[1].index_select(0, batch.block_ids), B * bs)
        prior_bias = self._bias(batch.prior_mask, S, R, G)
        if is_decode and self._nki_fits(B * bs):
            acc1, m1, l1 = self.nki(q, k1, v1, prior_bias)
        else:
            acc1, m1, l1 = torch_prior(q, k1, v1, prior_bias)
        k2 = per_sequence(key.index_select(0, batch.q_rows), Q)
        v2 = per_sequence(value.index_select(0, batch.q_rows), Q)
        acc2, m2, l2 = torch_prior(q, k2, v2, self._bias(batch.active_mask, S, R, G))
        m = torch.maximum(m1, m2)
        w1, w2 = torch.exp(m1 - m), torch.exp(m2 - m)
        o = (acc1 * w1 + acc2 * w2) / (l1 * w1 + l2 * w2)
        return o.view(S, kvh, G, Q, d).permute(0, 3, 1, 2, 4).reshape(S * Q, -1)

    @staticmethod
    def _bias(mask: torch.Tensor, S: int, R: int, G: int) -> torch.Tensor:
        """[S, 1, 1, Q, L] bool -> [S, 1, G * Q, L] additive float32 (0 / MASKED)."""
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        bias = bias.masked_fill_(~mask, MASKED)
        return bias.expand(S, 1, G, *mask.shape[-2:]).reshape(S, 1, R, mask.shape[-1])

    def _nki_fits(self, keys: int) -> bool:
        """The NKI kernel's tiles: whole 128-key tiles, head size and the query heads of
        one KV head within 128 partitions."""
        spec = self.spec
        return (self.nki is not None and keys % NKI_TILE == 0 and spec.head_size <= 128
                and spec.num_queries_per_kv <= 128)
