"""The JAX attention backends: `jax_ragged` (jax.numpy, any XLA device) and `pallas_ragged`
(the Pallas TPU kernel; on other devices it runs in Pallas' TPU interpret mode, for tests).

Same per-layer KV cache layout as the torch backends, [2, num_blocks, block_size,
num_kv_heads, head_size]; the JAX worker stacks the layers into one array
[num_layers, 2, ...] and passes `layer`. JAX arrays are immutable, so `forward` returns the
updated cache with the output instead of writing into it.
"""
from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from kvport.attention_backends.interface import AttentionBackend, CommonAttentionMetadata
from kvport_tpu.attention.metadata import (RaggedMetadata, build_ragged_metadata,
                                           count_prefill_tiles)
from kvport_tpu.attention.ragged import ragged_attention, storage_dtype
from kvport_tpu.attention.tiles_jnp import make_jnp_tile_fn
from kvport_tpu.buckets import StepShape


class JaxRaggedBackend(AttentionBackend):
    """Ragged paged attention in jax.numpy; also the reference for the Pallas kernel."""
    name = "jax_ragged"
    # Query rows per prefill tile: larger tiles read each page for more queries at once, but
    # pad short prompts more. Decode tiles always have one row.
    prefill_tile: ClassVar[int] = 16

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                       head_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @property
    def kv_dtype(self):
        """The dtype of the cached keys and values."""
        return jnp.dtype(self.spec.dtype)

    def cache_storage_dtype(self):
        """The dtype the cache array is allocated in: 16-bit floats as their uint16 bits
        (in-place scatters on every XLA backend; see attention/ragged.py)."""
        return storage_dtype(self.kv_dtype)

    def tile_fn(self):
        """The tile function (see attention/ragged.py) with this model's constants."""
        return make_jnp_tile_fn(self.spec.scale, self.spec.sliding_window, self.kv_dtype)

    def build_metadata(self, common: CommonAttentionMetadata, device=None,
                       shape: StepShape | None = None) -> RaggedMetadata:
        """Tiles and arrays padded to `shape` (the runner's bucket; default: no padding, the
        step's own sizes). Host numpy: jit moves it to the device with the step."""
        if shape is None:
            shape = StepShape(common.num_tokens, common.num_reqs, common.block_table.shape[1],
                              count_prefill_tiles(common.query_lens, self.prefill_tile))
        return build_ragged_metadata(common, shape, self.prefill_tile)

    def forward(self, query, key, value, kv_cache, metadata: RaggedMetadata, layer=0):
        """Write keys/values, attend; returns (output [T, H * d], updated cache). kv_cache is
        one layer's [2, ...] array, or the stacked [L, 2, ...] array with `layer` set, in
        the spec's dtype or in `cache_storage_dtype`."""
        single = kv_cache.ndim == 5
        cache = kv_cache[None] if single else kv_cache
        out, cache = ragged_attention(query, key, value, cache, layer, metadata,
                                      self.prefill_tile, self.tile_fn(), self.kv_dtype)
        return out, (cache[0] if single else cache)


class PallasRaggedBackend(JaxRaggedBackend):
    """The Pallas TPU kernel (attention/tiles_pallas.py). Off TPU it runs interpreted, which
    is slow and meant for checking the kernel, not for serving."""
    name = "pallas_ragged"

    def cache_storage_dtype(self):
        """The kernel reads pages in their own dtype (Mosaic has native bf16)."""
        return self.kv_dtype

    def tile_fn(self):
        from jax.experimental.pallas import tpu as pltpu

        from kvport_tpu.attention.tiles_pallas import make_pallas_tile_fn
        interpret = False if jax.default_backend() == "tpu" else pltpu.InterpretParams()
        return make_pallas_tile_fn(self.spec.scale, self.spec.sliding_window, self.kv_dtype,
                                   interpret)
