"""Host-side plan of one padded batch (numpy): the requests of one kind (decodes, or prefill
chunks) laid out as [S sequences, Q query rows], each with

    prior   the context before this step's tokens, read from the KV cache through a padded
            [S, B] block table: keys [S, B * block_size], mask prior_mask [S, Q, B * bs]
    active  this step's own tokens of the sequence, taken from the step's keys/values (not
            read back from the cache): keys [S, Q], mask active_mask [S, Q, Q] (causal)

This is how Neuron's NKI paged-attention kernels split the work (cached context tiles, then
the active tokens), so the torch formulation and the NKI kernel share one plan. Padding
follows kvport_neuron/buckets.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BatchPlan:
    q_rows: np.ndarray          # [S * Q] int64 token row of each query row (padding: 0)
    out_rows: np.ndarray        # [S * Q] int64 output row (padding: the dummy row)
    block_ids: np.ndarray       # [S * B] int64 prior blocks
    prior_mask: np.ndarray      # [S, Q, B * bs] bool
    active_mask: np.ndarray     # [S, Q, Q] bool
    num_seqs: int
    query_len: int
    num_blocks: int


def plan_batch(reqs: np.ndarray, qsl: np.ndarray, seq_lens: np.ndarray,
               block_table: np.ndarray, block_size: int, window: int | None, buckets,
               dummy_row: int) -> BatchPlan:
    """The padded plan of the requests `reqs` (indices into the step's rows)."""
    bs, n = block_size, len(reqs)
    lens = seq_lens[reqs].astype(np.int64)
    q_lens = (qsl[reqs + 1] - qsl[reqs]).astype(np.int64)
    ctx = lens - q_lens                                            # tokens before this step
    first = np.zeros_like(ctx) if window is None else np.maximum(ctx - window + 1, 0)
    start = np.minimum(first // bs, np.maximum(ctx - 1, 0) // bs)
    count = np.where(ctx > 0, -(-ctx // bs) - start, 0)
    S, Q, B = buckets.seqs(n), buckets.query(int(q_lens.max())), buckets.blocks(int(count.max()))

    last = block_table[reqs, (lens - 1) // bs].astype(np.int64)    # read by the step anyway
    cols = start[:, None] + np.arange(B)[None, :]
    real_block = np.arange(B)[None, :] < count[:, None]
    ids = np.take_along_axis(block_table[reqs].astype(np.int64),
                             np.minimum(cols, block_table.shape[1] - 1), axis=1)
    block_ids = np.full((S, B), last[0], dtype=np.int64)
    block_ids[:n] = np.where(real_block, ids, last[:, None])

    row = np.arange(Q)[None, :]
    real_row = np.zeros((S, Q), dtype=bool)
    real_row[:n] = row < q_lens[:, None]
    q_rows = np.zeros((S, Q), dtype=np.int64)
    q_rows[:n] = np.where(real_row[:n], qsl[reqs, None] + row, 0)
    out_rows = np.where(real_row, q_rows, dummy_row)

    prior = np.zeros((S, Q, B * bs), dtype=bool)
    q_pos = ctx[:, None, None] + row[:, :, None]                    # [n, Q, 1]
    k_pos = (start * bs)[:, None, None] + np.arange(B * bs)[None, None, :]
    visible = (k_pos < ctx[:, None, None]) & (q_pos >= 0)           # broadcast to [n, Q, L]
    if window is not None:
        visible &= k_pos > q_pos - window
    prior[:n] = visible & real_row[:n, :, None]

    j = np.arange(Q)[None, None, :]
    active = np.zeros((S, Q, Q), dtype=bool)
    causal = (j <= row[:, :, None]) & (j < q_lens[:, None, None])
    if window is not None:
        causal &= row[:, :, None] - j < window
    active[:n] = causal & real_row[:n, :, None]
    active[:, :, 0] |= ~real_row                                   # padding rows: one slot
    return BatchPlan(q_rows.reshape(-1), out_rows.reshape(-1), block_ids.reshape(-1), prior,
                     active, S, Q, B)
