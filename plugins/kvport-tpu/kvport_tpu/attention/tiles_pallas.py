"""The tile function as a Pallas TPU kernel: ragged paged attention, mixed prefill/decode.

Grid (tile, page): for each query tile, the pages of its sequence one at a time. The tile's
metadata, the layer and the block tables are scalar-prefetched into SMEM, so the BlockSpec of
the keys and values maps grid step (w, p) straight to the physical page
`block_table[seq[w], p]` of layer `layer`; Pallas' pipeline DMAs the next page from HBM while
the current one is multiplied. Page indices past the last page a tile needs are clamped to
it, so the pipeline fetches nothing new and the kernel skips the compute (`pl.when`).

In the kernel a tile is [kvh, tile * G, d]: the G query heads sharing a KV head are rows, so
one matmul per KV head covers them (GQA without repeating keys). The online softmax state
(max, sum, output) lives in VMEM scratch across the page axis and is written out at the last
page. The cache array is passed whole (no per-layer slice, which XLA could copy).

Checked on CPU in Pallas' TPU interpret mode against the jax.numpy tile function
(tests/test_jax_attention.py); it has not run on a real TPU here.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kvport_tpu.attention.metadata import TileSet

_NUM_SCALARS = 6   # layer, tile seq, tile q_pos, tile q_len, seq_lens, flat block table


def _kernel(layer_ref, seq_ref, q_pos_ref, q_len_ref, lens_ref, table_ref,   # SMEM
            q_ref, k_ref, v_ref,                                              # VMEM blocks
            o_ref,
            m_ref, l_ref, acc_ref,                                            # VMEM scratch
            *, block_size: int, group: int, scale: float, sliding_window: int | None,
            num_pages: int):
    del layer_ref, seq_ref, lens_ref, table_ref   # used by the index maps only
    w, p = pl.program_id(0), pl.program_id(1)
    kvh, rows, _ = q_ref.shape

    @pl.when(p == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    q_start, q_len = q_pos_ref[w], q_len_ref[w]
    page_start = p * block_size
    needed = (q_len > 0) & (page_start < q_start + q_len)
    if sliding_window is not None:
        needed &= page_start + block_size > q_start - sliding_window + 1

    @pl.when(needed)
    def _fold_page():
        row_pos = q_start + lax.broadcasted_iota(jnp.int32, (rows, block_size), 0) // group
        key_pos = page_start + lax.broadcasted_iota(jnp.int32, (rows, block_size), 1)
        allowed = key_pos <= row_pos
        if sliding_window is not None:
            allowed &= key_pos > row_pos - sliding_window
        for h in range(kvh):   # static: one matmul pair per KV head
            q, k, v = q_ref[h], k_ref[:, h, :], v_ref[:, h, :]
            if k.dtype != q.dtype:   # a cache stored as bits (see ragged.py)
                k, v = lax.bitcast_convert_type(k, q.dtype), lax.bitcast_convert_type(v, q.dtype)
            s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32) * scale
            s = jnp.where(allowed, s, -jnp.inf)
            m_prev = m_ref[h]
            m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            probs = jnp.exp(s - m_safe)
            correction = jnp.exp(m_prev - m_safe)
            l_ref[h] = l_ref[h] * correction + probs.sum(axis=1, keepdims=True)
            pv = lax.dot_general(probs.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
            acc_ref[h] = acc_ref[h] * correction + pv
            m_ref[h] = m_new

    @pl.when(p == num_pages - 1)
    def _finish():
        l = l_ref[...]
        o_ref[...] = (acc_ref[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


def _page_index_map(plane: int, block_size: int, blocks_per_seq: int):
    """(w, p) -> the cache block holding page p of tile w's sequence (clamped to its last)."""
    def index_map(w, p, layer_ref, seq_ref, q_pos_ref, q_len_ref, lens_ref, table_ref):
        last = jnp.maximum((q_pos_ref[w] + q_len_ref[w] - 1) // block_size, 0)
        page = jnp.minimum(p, last)
        return (layer_ref[0], plane, table_ref[seq_ref[w] * blocks_per_seq + page], 0, 0, 0)
    return index_map


def pallas_tile_attention(q_tiles: jnp.ndarray, cache: jnp.ndarray, layer, tiles: TileSet,
                          seq_lens: jnp.ndarray, block_table: jnp.ndarray, *, scale: float,
                          sliding_window: int | None, kv_dtype, interpret=False) -> jnp.ndarray:
    """[W, tile, H, d] attention of each tile over its sequence's pages (see ragged.py).

    interpret: False on a TPU; `pltpu.InterpretParams()` runs the kernel on CPU in Pallas'
    TPU interpret mode.
    """
    W, tile, H, d = q_tiles.shape
    _, _, _, block_size, kvh, _ = cache.shape
    group, blocks_per_seq = H // kvh, block_table.shape[1]
    rows = tile * group
    kv_dtype = jnp.dtype(kv_dtype)
    q = (q_tiles.astype(kv_dtype).reshape(W, tile, kvh, group, d)
         .transpose(0, 2, 1, 3, 4).reshape(W, kvh, rows, d))
    tile_spec = pl.BlockSpec((None, kvh, rows, d), lambda w, p, *_: (w, 0, 0, 0))
    page_block = (None, None, None, block_size, kvh, d)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=_NUM_SCALARS, grid=(W, blocks_per_seq),
        in_specs=[tile_spec,
                  pl.BlockSpec(page_block, _page_index_map(0, block_size, blocks_per_seq)),
                  pl.BlockSpec(page_block, _page_index_map(1, block_size, blocks_per_seq))],
        out_specs=tile_spec,
        scratch_shapes=[pltpu.VMEM((kvh, rows, 1), jnp.float32),
                        pltpu.VMEM((kvh, rows, 1), jnp.float32),
                        pltpu.VMEM((kvh, rows, d), jnp.float32)])
    kernel = functools.partial(_kernel, block_size=block_size, group=group, scale=scale,
                               sliding_window=sliding_window, num_pages=blocks_per_seq)
    out = pl.pallas_call(
        kernel, grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((W, kvh, rows, d), kv_dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
    )(jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)), tiles.seq, tiles.q_pos, tiles.q_len,
      seq_lens, block_table.reshape(-1), q, cache, cache)
    return out.reshape(W, kvh, tile, group, d).transpose(0, 2, 1, 3, 4).reshape(W, tile, H, d)


def make_pallas_tile_fn(scale: float, sliding_window: int | None, kv_dtype,
                        interpret=False):
    """A tile function with the model's constants bound."""
    def tile_fn(q_tiles, cache, layer, tiles, seq_lens, block_table):
        return pallas_tile_attention(q_tiles, cache, layer, tiles, seq_lens, block_table,
                                     scale=scale, sliding_window=sliding_window,
                                     kv_dtype=kv_dtype, interpret=interpret)
    return tile_fn
