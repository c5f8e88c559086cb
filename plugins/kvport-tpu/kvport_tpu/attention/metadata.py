"""Ragged attention metadata: a step's requests cut into query tiles, padded to a StepShape.

Both JAX attention implementations (jax.numpy and Pallas) work on query *tiles*: a tile holds
up to `tile` consecutive new tokens of one request and attends over that request's pages.

* decode tiles (one per sequence slot, tile size 1): requests with one new token, i.e.
  decode steps and one-token prefill chunks. No padding rows: a decode costs one query row.
* prefill tiles (tile size `prefill_tile`): requests with more new tokens, cut into pieces.

Queries are gathered into tiles by `*_token` (each tile row's token index) and the outputs
scattered back through `token_row` (each token's row in [decode rows; prefill rows]).
Everything here is host-side numpy, built once per step; the arrays' shapes depend only on
the StepShape, so the jitted step never sees a new shape outside the buckets.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from kvport.attention_backends.interface import CommonAttentionMetadata
from kvport_tpu.buckets import StepShape


class TileSet(NamedTuple):
    """Query tiles of one size. W tiles, `rows` = W * tile query rows."""
    seq: np.ndarray        # [W] int32 sequence slot of the tile (0 for padding tiles)
    q_pos: np.ndarray      # [W] int32 absolute position of the tile's first query
    q_len: np.ndarray      # [W] int32 valid queries in the tile (0 for padding tiles)
    token: np.ndarray      # [W * tile] int32 token index of each row (0 for padding rows)


class RaggedMetadata(NamedTuple):
    """One step's attention inputs (a pytree of arrays, so it can enter a jitted function)."""
    slots: np.ndarray          # [T] int32 cache slot of each new key/value; -1: padding
    token_row: np.ndarray      # [T] int32 row of each token in the concatenated tile output
    seq_lens: np.ndarray       # [S] int32 context length after this step (0: padding)
    block_table: np.ndarray    # [S, B] int32 physical block ids (0 past a sequence's end)
    decode: TileSet            # W = S tiles of 1 row
    prefill: TileSet           # W = shape.num_prefill_tiles tiles of `prefill_tile` rows


def count_prefill_tiles(query_lens: np.ndarray, tile: int) -> int:
    """How many prefill tiles the requests with more than one new token need."""
    long = query_lens[query_lens > 1]
    return int((-(-long // tile)).sum())


def build_ragged_metadata(common: CommonAttentionMetadata, shape: StepShape,
                          prefill_tile: int) -> RaggedMetadata:
    """Tile the step's requests and pad everything to `shape`."""
    T, S, B, Wp = (shape.num_tokens, shape.num_seqs, shape.blocks_per_seq,
                   shape.num_prefill_tiles)
    n, t = common.num_reqs, common.num_tokens
    qsl = common.query_start_loc.astype(np.int64)
    query_lens = qsl[1:] - qsl[:-1]
    if n > S or t > T or common.block_table.shape[1] > B:
        raise ValueError(f"step of {n} requests, {t} tokens, {common.block_table.shape[1]} "
                         f"blocks does not fit shape {shape}")
    seq_lens = np.zeros(S, np.int32)
    seq_lens[:n] = common.seq_lens
    block_table = np.zeros((S, B), np.int32)
    block_table[:n, :common.block_table.shape[1]] = common.block_table
    slots = np.full(T, -1, np.int32)
    slots[:t] = common.slot_mapping
    token_row = np.zeros(T, np.int32)

    decode = _empty_tiles(S, 1)
    one = np.flatnonzero(query_lens == 1)
    decode.seq[:len(one)] = one
    decode.q_pos[:len(one)] = common.seq_lens[one] - 1
    decode.q_len[:len(one)] = 1
    decode.token[:len(one)] = qsl[one]
    token_row[qsl[one]] = np.arange(len(one))

    prefill = _empty_tiles(Wp, prefill_tile)
    w = 0
    for i in np.flatnonzero(query_lens > 1).tolist():
        first_pos = int(common.seq_lens[i] - query_lens[i])
        for start in range(0, int(query_lens[i]), prefill_tile):
            count = min(prefill_tile, int(query_lens[i]) - start)
            if w >= Wp:
                raise ValueError(f"more prefill tiles than shape {shape} allows")
            tokens = qsl[i] + start + np.arange(count)
            prefill.seq[w], prefill.q_pos[w], prefill.q_len[w] = i, first_pos + start, count
            prefill.token[w * prefill_tile:w * prefill_tile + count] = tokens
            token_row[tokens] = S + w * prefill_tile + np.arange(count)
            w += 1
    return RaggedMetadata(slots, token_row, seq_lens, block_table, decode, prefill)


def _empty_tiles(num_tiles: int, tile: int) -> TileSet:
    return TileSet(seq=np.zeros(num_tiles, np.int32), q_pos=np.zeros(num_tiles, np.int32),
                   q_len=np.zeros(num_tiles, np.int32),
                   token=np.zeros(num_tiles * tile, np.int32))
