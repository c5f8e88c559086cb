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

Storage: a 16-bit float cache may be stored as its uint16 bit patterns (`storage_dtype`).
XLA's CPU backend does not scatter into a bfloat16 buffer in place (it converts the whole
buffer, every layer of every step); into 16-bit integers it does. Only what a step writes and
reads is bitcast, never the whole cache.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from jax import lax

from kvport_tpu.attention.metadata import RaggedMetadata, TileSet

TileFn = Callable[..., jnp.ndarray]


def storage_dtype(dtype) -> jnp.dtype:
    """How a cache of `dtype` values is stored by the jax.numpy backend."""
    dtype = jnp.dtype(dtype)
    is_float16 = dtype.itemsize == 2 and jnp.issubdtype(dtype, jnp.floating)
    return jnp.dtype(jnp.uint16) if is_float16 else dtype


def to_storage(values: jnp.ndarray, cache_dtype, kv_dtype) -> jnp.ndarray:
    values = values.astype(kv_dtype)
    if jnp.dtype(cache_dtype) == jnp.dtype(kv_dtype):
        return values
    return lax.bitcast_convert_type(values, cache_dtype)


def from_storage(values: jnp.ndarray, kv_dtype) -> jnp.ndarray:
    if values.dtype == jnp.dtype(kv_dtype):
        return values
    return lax.bitcast_convert_type(values, kv_dtype)


def write_kv(cache: jnp.ndarray, layer, key: jnp.ndarray, value: jnp.ndarray,
             slots: jnp.ndarray, kv_dtype) -> jnp.ndarray:
    """Scatter key/value [T, kvh, d] into `layer`'s slots; slots of -1 (padding) are dropped."""
    L, _, num_blocks, block_size, kvh, d = cache.shape
    plane = num_blocks * block_size
    flat = cache.reshape(L * 2 * plane, kvh, d)
    # padding goes to distinct indices past the end, which mode="drop" skips
    out_of_bounds = flat.shape[0] + jnp.arange(slots.shape[0], dtype=slots.dtype)
    base = layer * 2 * plane
    k_idx = jnp.where(slots >= 0, base + slots, out_of_bounds)
    v_idx = jnp.where(slots >= 0, base + plane + slots, out_of_bounds + slots.shape[0])
    index = jnp.concatenate([k_idx, v_idx])
    values = to_storage(jnp.concatenate([key, value]), cache.dtype, kv_dtype)
    flat = flat.at[index].set(values, mode="drop", unique_indices=True)
    return flat.reshape(cache.shape)


def ragged_attention(query: jnp.ndarray, key: jnp.ndarray, value: jnp.ndarray,
                     cache: jnp.ndarray, layer, md: RaggedMetadata, prefill_tile: int,
                     tile_fn: TileFn, kv_dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """query [T, H, d], key/value [T, kvh, d] -> ([T, H * d] in the query's dtype, cache).
    kv_dtype: the dtype of the cached values (the cache itself may hold their bits)."""
    T, H, d = query.shape
    cache = write_kv(cache, layer, key, value, md.slots, kv_dtype)
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
