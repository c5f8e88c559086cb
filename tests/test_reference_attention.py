"""The reference paged attention equals dense causal attention on fresh random inputs.

Dense attention here is written independently of the backend: each request's full keys and
values kept contiguously, then torch's scaled_dot_product_attention with an explicit mask.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kvport.attention_backends.interface import AttentionSpec, CommonAttentionMetadata
from kvport.attention_backends.torch_reference import TorchReferenceBackend


def dense_attention(q, k, v, num_queries_per_kv, sliding_window):
    """q [L, H, D] (the last L positions of a context of S), k/v [S, KVH, D] -> [L, H, D]."""
    query_len, seq_len = q.shape[0], k.shape[0]
    q_pos = torch.arange(seq_len - query_len, seq_len)[:, None]
    k_pos = torch.arange(seq_len)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= (q_pos - k_pos) < sliding_window
    k = k.repeat_interleave(num_queries_per_kv, dim=1)
    v = v.repeat_interleave(num_queries_per_kv, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1).double(), k.transpose(0, 1).double(),
                                         v.transpose(0, 1).double(), attn_mask=mask)
    return out.transpose(0, 1)


def run_step(backend, spec, requests, num_blocks, generator):
    """requests: list of (context_len, query_len). Fills earlier context through the cache
    first (as earlier steps would), then runs the step under test as one mixed batch."""
    shape = backend.kv_cache_shape(num_blocks, spec.block_size, spec.num_kv_heads, spec.head_size)
    dtype = getattr(torch, spec.dtype)
    cache = torch.randn(shape, generator=generator).to(dtype)   # stale data, never zeros
    free = torch.randperm(num_blocks, generator=generator).tolist()
    full_k, full_v, tables = [], [], []
    for context_len, query_len in requests:
        total = context_len + query_len
        blocks = [free.pop() for _ in range(-(-total // spec.block_size))]
        tables.append(blocks)
        full_k.append(torch.randn(total, spec.num_kv_heads, spec.head_size, generator=generator).to(dtype))
        full_v.append(torch.randn(total, spec.num_kv_heads, spec.head_size, generator=generator).to(dtype))
    for (context_len, _), blocks, k, v in zip(requests, tables, full_k, full_v):
        positions = np.arange(context_len)
        slots = torch.tensor(np.asarray(blocks)[positions // spec.block_size] * spec.block_size
                             + positions % spec.block_size, dtype=torch.int64)
        cache[0].view(-1, spec.num_kv_heads, spec.head_size)[slots] = k[:context_len]
        cache[1].view(-1, spec.num_kv_heads, spec.head_size)[slots] = v[:context_len]
    query_lens = [q for _, q in requests]
    query_start = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)
    table = np.zeros((len(requests), max(len(t) for t in tables)), dtype=np.int32)
    slots = []
    for i, ((context_len, query_len), blocks) in enumerate(zip(requests, tables)):
        table[i, :len(blocks)] = blocks
        pos = np.arange(context_len, context_len + query_len)
        slots.append(np.asarray(blocks)[pos // spec.block_size] * spec.block_size + pos % spec.block_size)
    common = CommonAttentionMetadata(
        query_start_loc=query_start, seq_lens=np.array([c + q for c, q in requests], dtype=np.int32),
        block_table=table, slot_mapping=np.concatenate(slots).astype(np.int64))
    query = torch.randn(sum(query_lens), spec.num_heads, spec.head_size, generator=generator).to(dtype)
    new_k = torch.cat([k[c:] for (c, _), k in zip(requests, full_k)])
    new_v = torch.cat([v[c:] for (c, _), v in zip(requests, full_v)])
    out = backend.forward(query, new_k, new_v, cache, backend.build_metadata(common, "cpu"))
    expected = torch.cat([dense_attention(query[query_start[i]:query_start[i + 1]].float(),
                                          full_k[i].float(), full_v[i].float(),
                                          spec.num_queries_per_kv, spec.sliding_window)
                          for i in range(len(requests))])
    return out.view(expected.shape), expected


MIXED = [(0, 17), (40, 1), (5, 1), (23, 9), (0, 1), (64, 1), (31, 33)]


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (12, 3), (16, 2)])
@pytest.mark.parametrize("head_size", [32, 64, 128])
@pytest.mark.parametrize("block_size", [1, 4, 16, 32])
def test_reference_equals_dense_causal_attention(num_heads, num_kv_heads, head_size, block_size):
    generator = torch.Generator().manual_seed(hash((num_heads, head_size, block_size)) % 2**31)
    spec = AttentionSpec(num_heads, num_kv_heads, head_size, block_size, "float32",
                         scale=head_size ** -0.5)
    out, expected = run_step(TorchReferenceBackend(spec), spec, MIXED, 256, generator)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [1, 5, 16])
def test_sliding_window(window):
    generator = torch.Generator().manual_seed(window)
    spec = AttentionSpec(8, 2, 64, 4, "float32", scale=0.125, sliding_window=window)
    out, expected = run_step(TorchReferenceBackend(spec), spec, MIXED, 256, generator)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_within_tolerance():
    generator = torch.Generator().manual_seed(11)
    spec = AttentionSpec(8, 2, 64, 16, "bfloat16", scale=0.125)
    out, expected = run_step(TorchReferenceBackend(spec), spec, MIXED, 64, generator)
    assert out.dtype == torch.bfloat16
    error = (out.double() - expected).norm() / expected.norm()
    assert error < 1e-2


def test_new_keys_and_values_land_in_their_slots():
    generator = torch.Generator().manual_seed(5)
    spec = AttentionSpec(4, 2, 16, 4, "float32", scale=0.25)
    backend = TorchReferenceBackend(spec)
    cache = torch.randn(backend.kv_cache_shape(8, 4, 2, 16), generator=generator)
    k, v = torch.randn(3, 2, 16, generator=generator), torch.randn(3, 2, 16, generator=generator)
    common = CommonAttentionMetadata(np.array([0, 3], dtype=np.int32), np.array([3], dtype=np.int32),
                                     np.array([[6]], dtype=np.int32), np.array([24, 25, 26]))
    backend.forward(torch.randn(3, 4, 16, generator=generator), k, v, cache,
                    backend.build_metadata(common, "cpu"))
    torch.testing.assert_close(cache[0, 6, :3], k)
    torch.testing.assert_close(cache[1, 6, :3], v)
