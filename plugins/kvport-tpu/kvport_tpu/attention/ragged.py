"""Ragged paged attention for a mixed batch, in JAX: the parts every implementation shares.

The KV cache of all layers is one array [L, 2, num_blocks, block_size, num_kv_heads,
head_size] (layer, keys/values, pages). It flows through the layers of a step as one value
and out of the jitted step, which donates it, so XLA updates it in place.

`ragged_attention` writes the step's keys and values, gathers the queries into tiles
(attention/metadata.py), runs a *tile function* on each tile set and scatters the rows back.
A tile function is one of two implementations of the same contract:

    tile_fn(q_tiles [W, tile, H, d], cache, layer, tiles: TileSet, seq_lens [S],
            block_table [S, B]) -> [W, tile, H, d]

attending each tile row (a query at absolute position q_pos + row) to the keys of its
sequence at positions <= its own (and > its own - sliding_window), over the sequence's pages.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from kvport_tpu.attention.metadata import RaggedMetadata, TileSet

TileFn = Callable[..., jnp.ndarray]


def write_kv(cache: jnp.ndarray, layer, key: jnp.ndarray, value: jnp.ndarray,
             slots: jnp.ndarray) -> jnp.ndarray:
    """Scatter key/value [T, kvh, d] into `layer`'s slots; slots of -1 (padding) are dropped."""
    L, _, num_blocks, block_size, kvh, d = cache.shape
    plane = num_blocks * block_size
    flat = cache.reshape(L * 2 * plane, kvh, d)
    out_of_bounds = flat.shape[0]   # mode="drop" skips it
    base = layer * 2 * plane
    k_idx = jnp.where(slots >= 0, base + slots, out_of_bounds)
    v_idx = jnp.where(slots >= 0, base + plane + slots, out_of_bounds)
    index = jnp.concatenate([k_idx, v_idx])
    values = jnp.concatenate([key, value]).astype(cache.dtype)
    return flat.at[index].set(values, mode="drop").reshape(cache.shape)


def ragged_attention(query: jnp.ndarray, key: jnp.ndarray, value: jnp.ndarray,
                     cache: jnp.ndarray, layer, md: RaggedMetadata, prefill_tile: int,
                     tile_fn: TileFn) -> tuple[jnp.ndarray, jnp.ndarray]:
    """query [T, H, d], key/value [T, kvh, d] -> ([T, H * d] in the query's dtype, cache)."""
    T, H, d = query.shape
    cache = write_kv(cache, layer, key, value, md.slots)
    outputs = []
    for tiles, tile in ((md.decode, 1), (md.prefill, prefill_tile)):
        num_tiles = tiles.seq.shape[0]
        if num_tiles == 0:
            continue
        q_tiles = query[tiles.token].reshape(num_tiles, tile, H, d)
        out = tile_fn(q_tiles, cache, layer, tiles, md.seq_lens, md.block_table)
        outputs.append(out.reshape(num_tiles * tile, H, d))
    rows = jnp.concatenate(outputs) if len(outputs) > 1 else outputs[0]
    return rows[md.token_row].reshape(T, H * d).astype(query.dtype), cache


def tile_query_positions(tiles: TileSet, tile: int) -> jnp.ndarray:
    """[W, tile] absolute position of each tile row's query."""
    return tiles.q_pos[:, None] + jnp.arange(tile, dtype=jnp.int32)[None, :]
