"""The JAX ragged paged attention (kvport-tpu) against the torch reference backend, and the
Pallas TPU kernel, run in Pallas' TPU interpret mode, against the jax.numpy version.

Every case is a mixed step on random inputs (fresh each run; the seed is in the failure
message): decode tokens, fresh prompts, continued chunks, a one-token prompt, with the
blocks of each request scattered over the cache.
"""
from __future__ import annotations

import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kvport.attention_backends.interface import AttentionSpec, CommonAttentionMetadata
from kvport.attention_backends.torch_reference import TorchReferenceBackend
from kvport_tpu.attention.backends import JaxRaggedBackend, PallasRaggedBackend
from kvport_tpu.attention.metadata import count_prefill_tiles
from kvport_tpu.buckets import ShapeBuckets

NUM_BLOCKS = 48


def random_step(rng, block_size: int, requests=None):
    """(common metadata, per-request (prior, q_len)) for a mixed step on scattered blocks."""
    if requests is None:
        requests = [(int(rng.integers(1, 60)), 1),                 # decodes
                    (int(rng.integers(1, 60)), 1),
                    (0, int(rng.integers(20, 45))),                # a fresh prompt
                    (int(rng.integers(5, 40)), int(rng.integers(2, 19))),   # a continued chunk
                    (0, 1),                                        # a one-token prompt
                    (int(rng.integers(40, 70)), 1)]
    free = list(rng.permutation(NUM_BLOCKS))
    query_start, seq_lens, slots, tables = [0], [], [], []
    for prior, q_len in requests:
        seq_len = prior + q_len
        blocks = [int(free.pop()) for _ in range(-(-seq_len // block_size))]
        tables.append(blocks)
        seq_lens.append(seq_len)
        query_start.append(query_start[-1] + q_len)
        slots += [blocks[p // block_size] * block_size + p % block_size
                  for p in range(prior, seq_len)]
    table = np.zeros((len(requests), max(map(len, tables))), np.int32)
    for i, blocks in enumerate(tables):
        table[i, :len(blocks)] = blocks
    return CommonAttentionMetadata(np.array(query_start, np.int32), np.array(seq_lens, np.int32),
                                   table, np.array(slots, np.int64))


def random_inputs(rng, common, spec: AttentionSpec):
    T = common.num_tokens
    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)
    return (normal(T, spec.num_heads, spec.head_size), normal(T, spec.num_kv_heads, spec.head_size),
            normal(T, spec.num_kv_heads, spec.head_size),
            normal(2, NUM_BLOCKS, spec.block_size, spec.num_kv_heads, spec.head_size))


def run_jax(backend, common, q, k, v, cache, dtype=jnp.float32):
    """The backend's forward on a padded bucket shape, jitted as the worker runs it."""
    buckets = ShapeBuckets(max_tokens=256, max_seqs=16, max_blocks=64,
                           prefill_tile=backend.prefill_tile)
    shape = buckets.shape_for(common.num_tokens, common.num_reqs, common.block_table.shape[1],
                              count_prefill_tiles(common.query_lens, backend.prefill_tile))
    md = backend.build_metadata(common, shape=shape)
    pad = ((0, shape.num_tokens - common.num_tokens), (0, 0), (0, 0))
    forward = jax.jit(backend.forward)
    out, new_cache = forward(*(jnp.asarray(np.pad(x, pad), dtype) for x in (q, k, v)),
                             jnp.asarray(cache, dtype), md)
    return (np.asarray(out[:common.num_tokens], np.float32),
            np.asarray(new_cache, np.float32))


def run_reference(spec, common, q, k, v, cache):
    backend = TorchReferenceBackend(spec)
    cache_t = torch.from_numpy(cache.copy())
    md = backend.build_metadata(common, "cpu")
    out = backend.forward(*(torch.from_numpy(x) for x in (q, k, v)), cache_t, md)
    return out.numpy(), cache_t.numpy()


def make_spec(heads, kv_heads, head_size, block_size, window=None, dtype="float32"):
    return AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_size=head_size,
                         block_size=block_size, dtype=dtype, scale=head_size ** -0.5,
                         sliding_window=window)


@pytest.mark.parametrize("heads, kv_heads, head_size, block_size, window", [
    (4, 4, 32, 16, None),      # MHA
    (8, 2, 64, 8, None),       # GQA 4:1
    (6, 1, 32, 32, None),      # MQA
    (8, 4, 16, 16, 13),        # sliding window, not a multiple of the block size
])
def test_jnp_matches_torch_reference(heads, kv_heads, head_size, block_size, window):
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    spec = make_spec(heads, kv_heads, head_size, block_size, window)
    common = random_step(rng, block_size)
    q, k, v, cache = random_inputs(rng, common, spec)
    out, new_cache = run_jax(JaxRaggedBackend(spec), common, q, k, v, cache)
    ref_out, ref_cache = run_reference(spec, common, q, k, v, cache)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=1e-5, err_msg=f"seed {seed}")
    np.testing.assert_array_equal(new_cache, ref_cache, err_msg=f"seed {seed}")


def test_jnp_bfloat16_cache_close_to_reference():
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    spec = make_spec(8, 2, 64, 16, dtype="bfloat16")
    common = random_step(rng, 16)
    q, k, v, cache = random_inputs(rng, common, spec)
    round_bf16 = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) for x in (q, k, v, cache)]
    out, _ = run_jax(JaxRaggedBackend(spec), common, *round_bf16, dtype=jnp.bfloat16)
    ref_out, _ = run_reference(make_spec(8, 2, 64, 16), common, *round_bf16)
    np.testing.assert_allclose(out, ref_out, atol=3e-2, rtol=3e-2, err_msg=f"seed {seed}")


def test_bfloat16_cache_stored_as_bits_gives_identical_results():
    """The worker allocates 16-bit caches as uint16 bit patterns (in-place scatters on XLA's
    CPU backend); reading and writing through them changes no bit."""
    rng = np.random.default_rng(secrets.randbits(32))
    spec = make_spec(8, 2, 32, 16, dtype="bfloat16")
    backend = JaxRaggedBackend(spec)
    assert backend.cache_storage_dtype() == jnp.uint16
    common = random_step(rng, 16)
    q, k, v, cache = random_inputs(rng, common, spec)
    md = backend.build_metadata(common)
    cache_bf16 = jnp.asarray(cache, jnp.bfloat16)
    cache_bits = jax.lax.bitcast_convert_type(cache_bf16, jnp.uint16)
    out_bf16, new_bf16 = backend.forward(q, k, v, cache_bf16, md)
    out_bits, new_bits = backend.forward(q, k, v, cache_bits, md)
    assert new_bits.dtype == jnp.uint16
    np.testing.assert_array_equal(np.asarray(out_bits, np.float32),
                                  np.asarray(out_bf16, np.float32))
    np.testing.assert_array_equal(np.asarray(new_bits),
                                  np.asarray(jax.lax.bitcast_convert_type(new_bf16, jnp.uint16)))


def test_single_layer_cache_and_stacked_cache_agree():
    """forward takes one layer's [2, ...] cache or the stacked [L, 2, ...] with `layer`."""
    rng = np.random.default_rng(secrets.randbits(32))
    spec = make_spec(4, 2, 32, 16)
    backend = JaxRaggedBackend(spec)
    common = random_step(rng, 16)
    q, k, v, cache = random_inputs(rng, common, spec)
    md = backend.build_metadata(common)
    out_single, cache_single = backend.forward(q, k, v, jnp.asarray(cache), md)
    stacked = jnp.stack([jnp.asarray(cache) * 0.5, jnp.asarray(cache)])
    out_stacked, cache_stacked = backend.forward(q, k, v, stacked, md, layer=1)
    np.testing.assert_allclose(np.asarray(out_single), np.asarray(out_stacked), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(cache_stacked[1]), np.asarray(cache_single))
    np.testing.assert_array_equal(np.asarray(cache_stacked[0]), np.asarray(stacked[0]))


@pytest.mark.parametrize("heads, kv_heads, head_size, block_size, window", [
    (8, 2, 32, 8, None),       # GQA 4:1, small blocks
    (4, 4, 32, 16, 21),        # MHA, sliding window
    (6, 3, 64, 32, None),      # GQA 2:1, large blocks
])
def test_pallas_kernel_in_interpret_mode_matches_jnp(heads, kv_heads, head_size, block_size,
                                                      window):
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    spec = make_spec(heads, kv_heads, head_size, block_size, window)
    common = random_step(rng, block_size)
    q, k, v, cache = random_inputs(rng, common, spec)
    pallas = PallasRaggedBackend(spec)
    assert jax.default_backend() != "tpu"   # so this runs interpreted
    out, new_cache = run_jax(pallas, common, q, k, v, cache)
    ref_out, ref_cache = run_jax(JaxRaggedBackend(spec), common, q, k, v, cache)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=1e-5, err_msg=f"seed {seed}")
    np.testing.assert_array_equal(new_cache, ref_cache, err_msg=f"seed {seed}")
