"""Paged attention for CPUs: batched decode, per-chunk prefill, one metadata build per step.

Same KV cache layout as the reference backend ([2, num_blocks, block_size, num_kv_heads,
head_size]), so the two are interchangeable on one cache. Where the reference loops over
requests in Python in every layer, this backend:

* plans the step once, in `build_metadata`: requests with one query token (decode steps, and
  prefill chunks of one token) are sorted by context length and cut into a few groups whose
  padding waste and gather size stay bounded; each group gets its flat padded block-id list,
  its output rows and an additive 0/-inf mask (exact masking: masked scores become -inf, so
  stale but finite values in unwritten or padded slots get probability 0). Prefill chunks get
  their block ids and, where `is_causal` cannot express it, a precomputed mask.
* per layer: writes K and V with one `index_copy_` each, then runs ONE
  `scaled_dot_product_attention` per decode group (its blocks gathered with one
  `index_select` into a reused workspace, GQA folded into the query length: the G query heads
  sharing a KV head become G query rows of one head, so no K/V is repeated) and one per
  prefill chunk (`enable_gqa=True`; a chunk with no prior context attends this step's own
  keys/values with `is_causal=True`, without gathering).

Attention runs on torch's fused CPU flash-attention kernel, which accumulates in float32 and
keeps a running softmax, so float32 matches the reference to ~1e-6 and bf16/fp16 keep float32
accumulation (inputs and probabilities are rounded to the cache dtype).

Decodes take the native path instead where it builds (kvport_cpu/native.py,
csrc/paged_decode.cpp): one op call per layer for all single-query requests, reading their
keys/values in place through the block table (no gather, no mask; float32 math whatever the
cache dtype). `decode_path` says which path the backend took and why.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from kvport.attention_backends.interface import (AttentionBackend, AttentionSpec,
                                                 CommonAttentionMetadata)

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every uninitialised buffer (outputs, workspace) comes from here; tests poison it."""
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass
class DecodeGroup:
    """Single-query requests attended together, padded to the group's longest context."""
    token_idx: torch.Tensor          # [n] int64 rows of the step's tokens (their queries)
    block_ids: torch.Tensor          # [n * num_blocks] int64 padded block ids, request-major
    num_reqs: int
    num_blocks: int                  # blocks gathered per request (padded)
    mask: torch.Tensor               # [n, 1, 1, num_blocks * block_size] additive 0 / -inf
    in_order: bool                   # token_idx == arange(n): rows 0..n-1 of the step
    kv_rows: tuple[int, torch.Tensor] | None = None   # see kv_rows(); memo of the first layer


def kv_rows(part: "DecodeGroup | PrefillChunk", num_cache_blocks: int) -> torch.Tensor:
    """Rows of the cache viewed as [2 * num_blocks, page] that hold `part`'s blocks: the keys'
    pages, then the values'. Computed once per step (every layer's cache has the same size).

    One index_select along dim 0 of that view runs at copy bandwidth; selecting along dim 1 of
    [2, num_blocks, page] measured 2.3x slower on the same bytes.
    """
    if part.kv_rows is None or part.kv_rows[0] != num_cache_blocks:
        ids = part.block_ids
        part.kv_rows = (num_cache_blocks, torch.cat([ids, ids + num_cache_blocks]))
    return part.kv_rows[1]


@dataclass
class PrefillChunk:
    """A request with several query tokens, attended on its own."""
    start: int                       # its tokens are rows start:end of the step
    end: int
    block_ids: torch.Tensor | None   # None: attend this step's own keys/values (no context)
    kv_len: int                      # keys attended (from kv_start on)
    mask: torch.Tensor | None        # [1, 1, q, kv_len] additive; None: plain causal
    kv_rows: tuple[int, torch.Tensor] | None = None   # see kv_rows(); memo of the first layer


@dataclass
class NativeDecode:
    """All single-query requests of a step, for the native op (which reads the blocks)."""
    token_idx: torch.Tensor          # [n] int64 rows of the step's tokens
    block_table: torch.Tensor        # [n, blocks] int64, the requests' own rows
    seq_lens: torch.Tensor           # [n] int64
    in_order: bool                   # token_idx == arange(n)


@dataclass
class CpuPagedMetadata:
    slot_mapping: torch.Tensor       # [num_tokens] int64
    num_tokens: int
    native_decode: NativeDecode | None = None      # set: decodes take the native op
    decode_groups: list[DecodeGroup] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)
    workspace_blocks: int = 0        # largest gather of one group or chunk, in blocks

    @property
    def all_native_decode(self) -> bool:
        """Every token of the step is a single-query request on the native op, in order."""
        native = self.native_decode
        return (native is not None and not self.prefills and native.in_order
                and native.token_idx.numel() == self.num_tokens)


class CpuPagedAttentionBackend(AttentionBackend):
    """Paged attention on CPU: decodes on the native op (else one fused SDPA per decode
    group), one fused SDPA per prefill chunk."""
    name = "cpu_paged"

    # Decode grouping. A group's gather (keys and values) stays under
    # `group_bytes_per_thread` x torch threads (or `max_group_bytes` where set): the gathered
    # keys/values then stay in the last-level cache between the gather and the attention
    # (4-8 MiB groups measured 10-25% faster than one 50 MiB group on a Cascade Lake core),
    # while each group keeps enough (request, KV head) pairs for every thread.
    group_bytes_per_thread: int = 4 * 2**20
    max_group_bytes: int | None = None
    # Sorted by context, a request opens a new group when padding it to the group's longest
    # context would waste more than this fraction of the padded length AND more than
    # `min_split_blocks` blocks (a group costs a few kernel launches, a padded block a little
    # memory traffic).
    split_waste_fraction: float = 0.25
    min_split_blocks: int = 8
    # Decodes on the native op (csrc/paged_decode.cpp) where it builds; False keeps them on
    # gather + SDPA (tests compare the two).
    use_native_decode: bool = True

    def __init__(self, spec: AttentionSpec):
        super().__init__(spec)
        self.dtype = TORCH_DTYPES[spec.dtype]
        self._block_bytes = 2 * spec.block_size * spec.num_kv_heads * spec.head_size * \
            torch.empty(0, dtype=self.dtype).element_size()           # keys and values
        self._workspace: dict[torch.dtype, torch.Tensor] = {}
        self._native = None               # (op or None, decode_path), chosen on first use

    @property
    def decode_path(self) -> str:
        """"native" or "gather+sdpa (<why not native>)". Reading it chooses the path, building
        the native op the first time in this process (tens of seconds; cached on disk)."""
        return self._native_decode_op()[1]

    def _native_decode_op(self):
        if self._native is None:
            if not self.use_native_decode:
                self._native = (None, "gather+sdpa (use_native_decode is False)")
            else:
                from kvport_cpu.native import paged_decode_op
                native = paged_decode_op()
                self._native = (native.out, "native" if native.out is not None
                                else f"gather+sdpa (native decode unavailable: {native.reason})")
            logger.info("cpu_paged decode path: %s", self._native[1])
        return self._native

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                       head_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    # Once per step ---------------------------------------------------------------------
    def build_metadata(self, common: CommonAttentionMetadata, device) -> CpuPagedMetadata:
        spec = self.spec
        bs, window = spec.block_size, spec.sliding_window
        qsl = common.query_start_loc.astype(np.int64)
        seq_lens = common.seq_lens.astype(np.int64)
        query_lens = qsl[1:] - qsl[:-1]
        block_table = common.block_table
        metadata = CpuPagedMetadata(
            slot_mapping=torch.from_numpy(common.slot_mapping.astype(np.int64)).to(device),
            num_tokens=common.num_tokens)
        if common.num_reqs == 0:
            return metadata
        # First position any query of a request may see, rounded down to its block.
        first_query = seq_lens - query_lens
        if window is None:
            first_key = np.zeros_like(seq_lens)
        else:
            first_key = np.maximum(first_query - window + 1, 0)
        start_block = first_key // bs
        end_block = -(-seq_lens // bs)
        num_blocks = end_block - start_block
        workspace = 0

        decode = np.flatnonzero(query_lens == 1)
        if decode.size and self._native_decode_op()[0] is not None:
            rows = block_table[decode, :int(end_block[decode].max())].astype(np.int64)
            token_idx = qsl[decode]
            metadata.native_decode = NativeDecode(
                token_idx=torch.from_numpy(token_idx).to(device),
                block_table=torch.from_numpy(rows).to(device),
                seq_lens=torch.from_numpy(seq_lens[decode]).to(device),
                in_order=bool(np.array_equal(token_idx, np.arange(decode.size))))
        elif decode.size:
            groups = self._plan_decode_groups(num_blocks[decode])
            for members in groups:
                reqs = decode[members]
                workspace = max(workspace, int(num_blocks[reqs].max()) * len(reqs))
                metadata.decode_groups.append(
                    self._decode_group(reqs, qsl, seq_lens, start_block, num_blocks,
                                       block_table, device))

        for i in np.flatnonzero(query_lens > 1).tolist():
            start, end = int(qsl[i]), int(qsl[i + 1])
            q_len, seq_len = end - start, int(seq_lens[i])
            if seq_len == q_len:        # no prior context: attend the new keys directly
                mask = None
                if window is not None and q_len > window:
                    mask = self._mask(q_len, seq_len, 0, q_len, device)
                metadata.prefills.append(PrefillChunk(start, end, None, q_len, mask))
                continue
            sb, nb = int(start_block[i]), int(num_blocks[i])
            kv_start = sb * bs
            kv_len = seq_len - kv_start
            ids = torch.from_numpy(block_table[i, sb:sb + nb].astype(np.int64)).to(device)
            mask = self._mask(q_len, seq_len, kv_start, kv_len, device)
            metadata.prefills.append(PrefillChunk(start, end, ids, kv_len, mask))
            workspace = max(workspace, nb)
        metadata.workspace_blocks = workspace
        return metadata

    def _plan_decode_groups(self, num_blocks: np.ndarray) -> list[np.ndarray]:
        """Split single-query requests (by their block counts) into groups; indices into
        `num_blocks`, longest first."""
        budget = self.max_group_bytes
        if budget is None:
            budget = self.group_bytes_per_thread * torch.get_num_threads()
        max_blocks = max(budget // self._block_bytes, 1)
        if num_blocks.size * int(num_blocks.max()) <= max_blocks and \
                int(num_blocks.max()) - int(num_blocks.min()) <= self.min_split_blocks:
            return [np.arange(num_blocks.size)]          # the common case: one group
        order = np.argsort(-num_blocks, kind="stable")
        groups, current, group_max = [], [], 0
        for j in order.tolist():
            nb = int(num_blocks[j])
            if current:
                waste = group_max - nb
                too_big = (len(current) + 1) * group_max > max_blocks
                too_wasteful = (waste > self.min_split_blocks
                                and waste > self.split_waste_fraction * group_max)
                if too_big or too_wasteful:
                    groups.append(np.asarray(current))
                    current = []
            if not current:
                group_max = nb
            current.append(j)
        groups.append(np.asarray(current))
        return groups

    def _decode_group(self, reqs: np.ndarray, qsl, seq_lens, start_block, num_blocks,
                      block_table, device) -> DecodeGroup:
        bs, window = self.spec.block_size, self.spec.sliding_window
        n = len(reqs)
        nb = int(num_blocks[reqs].max())
        offsets = np.arange(nb)
        cols = start_block[reqs, None] + np.minimum(offsets[None, :], num_blocks[reqs, None] - 1)
        # Padding repeats the request's own last block; the mask hides it.
        ids = np.take_along_axis(block_table[reqs].astype(np.int64), cols, axis=1)
        pos = start_block[reqs, None] * bs + np.arange(nb * bs)[None, :]     # absolute
        last = seq_lens[reqs, None] - 1
        allowed = pos <= last
        if window is not None:
            allowed &= pos > last - window
        mask = np.where(allowed, 0.0, -np.inf).astype(np.float32)
        token_idx = qsl[reqs]
        return DecodeGroup(
            token_idx=torch.from_numpy(token_idx).to(device),
            block_ids=torch.from_numpy(ids.reshape(-1)).to(device),
            num_reqs=n, num_blocks=nb,
            mask=torch.from_numpy(mask).to(device=device, dtype=self.dtype).view(n, 1, 1, -1),
            in_order=bool(np.array_equal(token_idx, np.arange(n))))

    def _mask(self, q_len: int, seq_len: int, kv_start: int, kv_len: int,
              device) -> torch.Tensor:
        """[1, 1, q_len, kv_len] additive causal (and sliding-window) mask of a chunk whose
        queries are the last q_len positions and whose keys start at kv_start."""
        q_pos = torch.arange(seq_len - q_len, seq_len, device=device)[:, None]
        k_pos = torch.arange(kv_start, kv_start + kv_len, device=device)[None, :]
        allowed = k_pos <= q_pos
        if self.spec.sliding_window is not None:
            allowed &= k_pos > q_pos - self.spec.sliding_window
        mask = torch.zeros(q_len, kv_len, dtype=self.dtype, device=device)
        return mask.masked_fill_(~allowed, float("-inf")).view(1, 1, q_len, kv_len)

    # Per layer -------------------------------------------------------------------------
    def forward(self, query, key, value, kv_cache, metadata: CpuPagedMetadata):
        spec = self.spec
        kvh, d, bs = spec.num_kv_heads, spec.head_size, spec.block_size
        H, G = spec.num_heads, spec.num_queries_per_kv
        cache_dtype = kv_cache.dtype
        key_c, value_c = key.to(cache_dtype), value.to(cache_dtype)
        kv_cache[0].view(-1, kvh, d).index_copy_(0, metadata.slot_mapping, key_c)
        kv_cache[1].view(-1, kvh, d).index_copy_(0, metadata.slot_mapping, value_c)

        T = query.shape[0]
        groups, prefills, native = metadata.decode_groups, metadata.prefills, metadata.native_decode
        if metadata.all_native_decode:
            return self._native_decode(query, kv_cache, native).to(query.dtype)   # pure decode
        q_all = query.to(cache_dtype)
        pages = kv_cache.view(2 * kv_cache.shape[1], bs * kvh * d)     # keys' rows, values' rows
        workspace = self._get_workspace(cache_dtype, metadata.workspace_blocks * bs * kvh * d,
                                        query.device)
        if len(groups) == 1 and not prefills and groups[0].num_reqs == T and groups[0].in_order:
            out = self._decode(q_all, groups[0], pages, workspace)      # a pure decode step
            return out.to(query.dtype)

        out = _empty((T, H * d), query.dtype, query.device)
        if native is not None:
            out.index_copy_(0, native.token_idx,
                            self._native_decode(query, kv_cache, native).to(query.dtype))
        for group in groups:
            out.index_copy_(0, group.token_idx,
                            self._decode(q_all, group, pages, workspace).to(query.dtype))
        for chunk in prefills:
            q_len = chunk.end - chunk.start
            q = q_all[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)     # [1, H, q, d]
            if chunk.block_ids is None:
                k = key_c[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)  # [1, kvh, q, d]
                v = value_c[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)
            else:
                nb = chunk.block_ids.numel()
                kv = workspace[:2 * nb * bs * kvh * d].view(2 * nb, bs * kvh * d)
                torch.index_select(pages, 0, kv_rows(chunk, kv_cache.shape[1]), out=kv)
                kv = kv.view(2, nb * bs, kvh, d)[:, :chunk.kv_len]
                k = kv[0].transpose(0, 1).unsqueeze(0)                       # [1, kvh, L, d]
                v = kv[1].transpose(0, 1).unsqueeze(0)
            mask = None if chunk.mask is None else chunk.mask.to(cache_dtype)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               is_causal=chunk.mask is None,
                                               scale=spec.scale, enable_gqa=G > 1)
            out[chunk.start:chunk.end].view(q_len, H, d).copy_(o[0].transpose(0, 1))
        return out

    def _native_decode(self, query: torch.Tensor, kv_cache: torch.Tensor,
                       native: NativeDecode) -> torch.Tensor:
        """[n, H * d] float32 attention of the step's single-query requests, on the native op.
        The query stays float32 (not rounded to the cache dtype): the op computes in float32."""
        spec = self.spec
        n = native.token_idx.numel()
        q = query[:n] if native.in_order else query.index_select(0, native.token_idx)
        q = q.reshape(n, spec.num_heads, spec.head_size).float()
        out = _empty((n, spec.num_heads, spec.head_size), torch.float32, query.device)
        self._native_decode_op()[0](out, q, kv_cache, native.block_table, native.seq_lens,
                                    spec.scale, spec.sliding_window)
        return out.view(n, spec.num_heads * spec.head_size)

    def _decode(self, q_all: torch.Tensor, group: DecodeGroup, pages: torch.Tensor,
                workspace: torch.Tensor) -> torch.Tensor:
        """[n, H * d] attention of one decode group, in the cache dtype."""
        spec = self.spec
        kvh, d, bs = spec.num_kv_heads, spec.head_size, spec.block_size
        n, nb = group.num_reqs, group.num_blocks
        q = q_all[:n] if group.in_order else q_all.index_select(0, group.token_idx)
        q = q.reshape(n, kvh, spec.num_queries_per_kv, d)       # G query rows per KV head
        kv = workspace[:2 * n * nb * bs * kvh * d].view(2 * n * nb, bs * kvh * d)
        torch.index_select(pages, 0, kv_rows(group, pages.shape[0] // 2), out=kv)
        kv = kv.view(2, n, nb * bs, kvh, d)
        k, v = kv[0].transpose(1, 2), kv[1].transpose(1, 2)     # [n, kvh, L, d], strided
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=group.mask.to(q.dtype),
                                           scale=spec.scale)    # [n, kvh, G, d]
        return o.reshape(n, spec.num_heads * d)

    def _get_workspace(self, dtype: torch.dtype, elems: int, device) -> torch.Tensor:
        """A reused buffer of at least 2 * elems (keys and values): allocating tens of MiB
        per layer costs page faults on every call."""
        buf = self._workspace.get(dtype)
        if buf is None or buf.numel() < 2 * elems or buf.device != torch.device(device):
            buf = _empty(max(2 * elems, 1), dtype, device)
            self._workspace[dtype] = buf
        return buf
