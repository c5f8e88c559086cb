"""The tile function in plain jax.numpy: runs on any XLA device, and is the reference the
Pallas kernel is checked against.

Each tile gathers its sequence's pages `chunk_pages` at a time and folds them into an online
softmax (running max, running sum, running output), so memory stays at one chunk of keys per
tile whatever the context length. Arithmetic is float32 (float32 scores and sums; bf16 caches
multiply in bf16 with float32 accumulation).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from kvport_tpu.attention.metadata import TileSet
from kvport_tpu.attention.ragged import from_storage, tile_query_positions

DEFAULT_CHUNK_TOKENS = 128


def _precision(dtype) -> lax.Precision:
    # float32 means float32: without HIGHEST, GPUs would multiply in TF32.
    return lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT


def jnp_tile_attention(q_tiles: jnp.ndarray, cache: jnp.ndarray, layer, tiles: TileSet,
                       seq_lens: jnp.ndarray, block_table: jnp.ndarray, *, scale: float,
                       sliding_window: int | None, kv_dtype,
                       chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> jnp.ndarray:
    """[W, tile, H, d] attention of each tile over its sequence's pages (see ragged.py)."""
    del seq_lens   # a row's own position bounds its keys; positions past the end are never read
    W, tile, H, d = q_tiles.shape
    L, _, num_blocks, block_size, kvh, _ = cache.shape
    G = H // kvh
    pages = block_table[tiles.seq]                               # [W, B]
    chunk = max(min(chunk_tokens // block_size, pages.shape[1]), 1)
    num_chunks = -(-pages.shape[1] // chunk)
    pages = jnp.pad(pages, ((0, 0), (0, num_chunks * chunk - pages.shape[1])))
    flat = cache.reshape(L * 2 * num_blocks, block_size, kvh, d)
    k_base = layer * 2 * num_blocks
    dtype = jnp.dtype(kv_dtype)
    precision = _precision(dtype)
    q = q_tiles.astype(dtype).reshape(W, tile, kvh, G, d)
    q_pos = tile_query_positions(tiles, tile)                    # [W, tile]
    span = chunk * block_size

    def fold_chunk(carry, c):
        m, l, acc = carry                    # [W, kvh, G, tile] x2, [W, kvh, G, tile, d]
        ids = lax.dynamic_slice_in_dim(pages, c * chunk, chunk, axis=1)        # [W, chunk]
        k = from_storage(flat[k_base + ids], dtype).reshape(W, span, kvh, d)
        v = from_storage(flat[k_base + num_blocks + ids], dtype).reshape(W, span, kvh, d)
        s = jnp.einsum("wtkgd,wskd->wkgts", q, k, precision=precision,
                       preferred_element_type=jnp.float32) * scale
        k_pos = c * span + jnp.arange(span, dtype=jnp.int32)
        allowed = k_pos[None, None, :] <= q_pos[:, :, None]                   # [W, tile, span]
        if sliding_window is not None:
            allowed &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
        s = jnp.where(allowed[:, None, None], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)     # rows with nothing seen yet
        p = jnp.exp(s - m_safe[..., None])
        correction = jnp.exp(m - m_safe)
        l = l * correction + p.sum(axis=-1)
        pv = jnp.einsum("wkgts,wskd->wkgtd", p.astype(dtype), v, precision=precision,
                        preferred_element_type=jnp.float32)
        return (m_new, l, acc * correction[..., None] + pv), None

    init = (jnp.full((W, kvh, G, tile), -jnp.inf, jnp.float32),
            jnp.zeros((W, kvh, G, tile), jnp.float32),
            jnp.zeros((W, kvh, G, tile, d), jnp.float32))
    (_, l, acc), _ = lax.scan(fold_chunk, init, jnp.arange(num_chunks))
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return out.transpose(0, 3, 1, 2, 4).reshape(W, tile, H, d)


def make_jnp_tile_fn(scale: float, sliding_window: int | None, kv_dtype,
                     chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
    """A tile function with the model's constants bound."""
    def tile_fn(q_tiles, cache, layer, tiles, seq_lens, block_table):
        return jnp_tile_attention(q_tiles, cache, layer, tiles, seq_lens, block_table,
                                  scale=scale, sliding_window=sliding_window,
                                  kv_dtype=kv_dtype, chunk_tokens=chunk_tokens)
    return tile_fn

