"""Host-side plans of a step's attention (numpy), padded to buckets; attention.py turns
them into device tensors once per step and every layer reuses them.

Decode requests (one new token) get the *flat* layout: one list of every block any of them
reads, in request order, with

    block_list     [NB]     the physical block of each entry
    block_mapping  [NB, S]  one-hot: entry -> its request (its decode row)
    block_bias     [NB, bs] 0 where the request's query may see the slot, -inf elsewhere
    block_weight   [NB]     1 / (entries of its request): averages per-block values per request

so that broadcasting a request's value to its blocks and summing its blocks' values are the
matrix products `mapping @ x` and `mapping.T @ y`: no per-request gather, no loop, shapes
fixed by the buckets. Padding entries map to no request (a zero row of the mapping) and
re-read the first entry's block with a zero query; padding requests own no entry.

Prefill chunks (several new tokens) get the padded layout: [P, Q] query rows, [P, B] context
blocks per request and a [P, Q, B * bs] bias (causal, sliding window, padding). A padding row
sees one slot (key 0 of its first block), so its softmax stays finite; it is never written
back. Padding block ids repeat a block the step reads anyway (the request's last one, or the
first request's): padding never reads a block outside the step's own, whose contents nobody
vouches for.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvport_gaudi.buckets import GaudiBuckets


@dataclass
class DecodePlan:
    q_rows: np.ndarray          # [S] int64 token row of each decode request (padding: 0)
    out_rows: np.ndarray        # [S] int64 output row (padding: the dummy row)
    block_list: np.ndarray      # [NB] int64
    block_mapping: np.ndarray   # [NB, S] float32 one-hot
    block_bias: np.ndarray      # [NB, bs] float32
    block_weight: np.ndarray    # [NB] float32


@dataclass
class PrefillPlan:
    q_rows: np.ndarray          # [P * Q] int64 (padding: 0)
    out_rows: np.ndarray        # [P * Q] int64 (padding: the dummy row)
    block_ids: np.ndarray       # [P * B] int64 (padding: 0)
    bias: np.ndarray            # [P, Q, B * bs] float32
    num_seqs: int               # P
    query_len: int              # Q
    num_blocks: int             # B


def first_visible(seq_lens: np.ndarray, query_lens: np.ndarray,
                  window: int | None) -> np.ndarray:
    """The first position any query of each request may see."""
    if window is None:
        return np.zeros_like(seq_lens)
    return np.maximum(seq_lens - query_lens - window + 1, 0)


def plan_decode(reqs: np.ndarray, qsl: np.ndarray, seq_lens: np.ndarray,
                block_table: np.ndarray, block_size: int, window: int | None,
                buckets: GaudiBuckets, dummy_row: int) -> DecodePlan:
    """The flat plan of the single-token requests `reqs` (indices into the step's rows)."""
    bs = block_size
    lens = seq_lens[reqs].astype(np.int64)
    first = first_visible(lens, np.ones_like(lens), window)
    start, end = first // bs, -(-lens // bs)
    counts = end - start
    owner = np.repeat(np.arange(len(reqs)), counts)                   # entry -> decode row
    index = np.arange(owner.size) - np.repeat(np.cumsum(counts) - counts, counts)
    column = start[owner] + index                                     # block-table column
    num_seqs, num_entries = buckets.decode_seqs(len(reqs)), buckets.decode_blocks(owner.size)

    block_list = np.zeros(num_entries, dtype=np.int64)
    block_list[:owner.size] = block_table[reqs[owner], column]
    block_list[owner.size:] = block_list[0]
    mapping = np.zeros((num_entries, num_seqs), dtype=np.float32)
    mapping[np.arange(owner.size), owner] = 1.0
    pos = column[:, None] * bs + np.arange(bs)[None, :]
    visible = (pos >= first[owner, None]) & (pos < lens[owner, None])
    bias = np.zeros((num_entries, bs), dtype=np.float32)
    bias[:owner.size] = np.where(visible, 0.0, -np.inf)
    weight = np.zeros(num_entries, dtype=np.float32)
    weight[:owner.size] = 1.0 / counts[owner]
    q_rows = np.zeros(num_seqs, dtype=np.int64)
    q_rows[:len(reqs)] = qsl[reqs]
    out_rows = np.full(num_seqs, dummy_row, dtype=np.int64)
    out_rows[:len(reqs)] = qsl[reqs]
    return DecodePlan(q_rows, out_rows, block_list, mapping, bias, weight)


def plan_prefill(reqs: np.ndarray, qsl: np.ndarray, seq_lens: np.ndarray,
                 block_table: np.ndarray, block_size: int, window: int | None,
                 buckets: GaudiBuckets, dummy_row: int) -> PrefillPlan:
    """The padded plan of the multi-token requests `reqs`."""
    bs = block_size
    lens = seq_lens[reqs].astype(np.int64)
    q_lens = (qsl[reqs + 1] - qsl[reqs]).astype(np.int64)
    first = first_visible(lens, q_lens, window)
    start, end = first // bs, -(-lens // bs)
    P = buckets.prefill_seqs(len(reqs))
    Q = buckets.prefill_query(int(q_lens.max()))
    B = buckets.prefill_blocks(int((end - start).max()))

    q_rows = np.zeros((P, Q), dtype=np.int64)
    out_rows = np.full((P, Q), dummy_row, dtype=np.int64)
    block_ids = np.zeros((P, B), dtype=np.int64)
    bias = np.full((P, Q, B * bs), -np.inf, dtype=np.float32)
    bias[:, :, 0] = 0.0                                   # padding rows: see one slot
    for p, i in enumerate(reqs.tolist()):
        q, n = int(q_lens[p]), int(end[p] - start[p])
        rows = np.arange(qsl[i], qsl[i] + q)
        q_rows[p, :q], out_rows[p, :q] = rows, rows
        block_ids[p, :n] = block_table[i, start[p]:end[p]]
        block_ids[p, n:] = block_ids[p, n - 1]
        q_pos = np.arange(lens[p] - q, lens[p])[:, None]
        k_pos = start[p] * bs + np.arange(B * bs)[None, :]
        visible = k_pos <= q_pos
        if window is not None:
            visible &= k_pos > q_pos - window
        bias[p, :q] = np.where(visible, 0.0, -np.inf)
    block_ids[len(reqs):] = block_ids[0, 0]
    return PrefillPlan(q_rows.reshape(-1), out_rows.reshape(-1), block_ids.reshape(-1), bias,
                       P, Q, B)
