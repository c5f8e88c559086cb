"""The CPU plugin's cpu_paged attention backend against the torch reference.

Every case builds one step from fresh random data: a randn-filled KV cache (so unwritten
slots hold stale but finite values), shuffled non-contiguous block tables, randn queries,
keys and values. Both backends run the same step on their own copy of the cache over two
"layers" (the metadata and the backend's workspace are reused, as in a model); outputs must
match and the caches must be identical afterwards. Every buffer cpu_paged allocates
uninitialised is NaN-poisoned, and block 0 (which no request owns; block tables are padded
with 0) holds NaN, so a row left unwritten or a read outside a request's blocks shows up.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvport.attention_backends.interface import AttentionSpec, CommonAttentionMetadata
from kvport.attention_backends.torch_reference import TorchReferenceBackend
from kvport_cpu import attention as cpu_attention
from kvport_cpu.attention import CpuPagedAttentionBackend

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# fp32: the same math in another order. bf16/fp16: inputs and probabilities rounded.
TOLERANCE = {"float32": (1e-5, 1e-5), "bfloat16": (2e-2, 2e-2), "float16": (3e-3, 3e-3)}


@pytest.fixture(autouse=True, params=["native", "gather"])
def decode_path(request, monkeypatch):
    """Every case runs on both decode paths: the native op (tests/test_cpu_native_decode.py
    tests it on its own) and gather + SDPA, which stays the path where the op cannot build."""
    monkeypatch.setattr(CpuPagedAttentionBackend, "use_native_decode",
                        request.param == "native")
    return request.param


def gather_backend(spec) -> CpuPagedAttentionBackend:
    """cpu_paged on gather + SDPA, for the cases that look at its decode groups."""
    backend = CpuPagedAttentionBackend(spec)
    backend.use_native_decode = False
    return backend


@pytest.fixture(autouse=True)
def poison_uninitialised_buffers(monkeypatch):
    def nan_empty(shape, dtype, device):
        return torch.full(shape if isinstance(shape, tuple) else (shape,), float("nan"),
                          dtype=dtype, device=device)
    monkeypatch.setattr(cpu_attention, "_empty", nan_empty)


def make_step(requests, *, block_size, num_kv_heads=2, group=3, head_size=64,
              dtype="float32", sliding_window=None, seed=0, shared=None):
    """One step of `requests` [(context_len, query_len), ...] in batch order.

    shared: {request: (other request, n)}: the request's first n blocks are the other's
    first n (prefix sharing; the other one may be writing them in this very step).
    Returns (spec, common, query, key, value, [cache_layer0, cache_layer1]).
    """
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    shared = shared or {}
    bs = block_size
    needed = [-(-(c + q) // bs) for c, q in requests]
    own = [n - shared[i][1] if i in shared else n for i, n in enumerate(needed)]
    num_blocks = 1 + sum(own) + 7                       # block 0 is never handed out
    free = list(rng.permutation(np.arange(1, num_blocks)))
    tables = [[int(free.pop()) for _ in range(n)] for n in own]
    for i, (src, n) in shared.items():
        tables[i] = tables[src][:n] + tables[i]
    max_blocks = max(needed) + 2                        # trailing 0 entries, as the runner pads
    block_table = np.zeros((len(requests), max_blocks), dtype=np.int32)
    for i, t in enumerate(tables):
        block_table[i, :len(t)] = t
    query_lens = [q for _, q in requests]
    seq_lens = np.array([c + q for c, q in requests], dtype=np.int32)
    qsl = np.zeros(len(requests) + 1, dtype=np.int32)
    qsl[1:] = np.cumsum(query_lens)
    slots = []
    for i, (c, q) in enumerate(requests):
        pos = np.arange(c, c + q)
        slots.append(block_table[i, pos // bs].astype(np.int64) * bs + pos % bs)
    common = CommonAttentionMetadata(query_start_loc=qsl, seq_lens=seq_lens,
                                     block_table=block_table, slot_mapping=np.concatenate(slots))
    spec = AttentionSpec(num_heads=num_kv_heads * group, num_kv_heads=num_kv_heads,
                         head_size=head_size, block_size=bs, dtype=dtype,
                         scale=head_size ** -0.5, sliding_window=sliding_window)
    tdtype = DTYPES[dtype]
    T = int(qsl[-1])

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(tdtype)

    caches = []
    for _ in range(2):
        cache = randn(2, num_blocks, bs, num_kv_heads, head_size)
        cache[:, 0] = float("nan")
        caches.append(cache)
    layers = [(randn(T, spec.num_heads, head_size), randn(T, num_kv_heads, head_size),
               randn(T, num_kv_heads, head_size)) for _ in range(2)]
    return spec, common, layers, caches


def check_against_reference(spec, common, layers, caches, backend=None):
    ref = TorchReferenceBackend(spec)
    fast = backend or CpuPagedAttentionBackend(spec)
    ref_meta, fast_meta = ref.build_metadata(common, "cpu"), fast.build_metadata(common, "cpu")
    atol, rtol = TOLERANCE[spec.dtype]
    for (q, k, v), cache in zip(layers, caches):
        ref_cache, fast_cache = cache.clone(), cache.clone()
        expected = ref.forward(q, k, v, ref_cache, ref_meta)
        out = fast.forward(q.clone(), k.clone(), v.clone(), fast_cache, fast_meta)
        assert out.shape == expected.shape == (q.shape[0], spec.num_heads * spec.head_size)
        assert out.dtype == q.dtype
        assert not out.isnan().any(), "unwritten or NaN output rows"
        torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=rtol)
        torch.testing.assert_close(fast_cache, ref_cache, atol=0, rtol=0, equal_nan=True)
    return fast_meta


def mixed_requests(bs: int, seed: int) -> list[tuple[int, int]]:
    """Decodes (first token, block-boundary, long) and prefill chunks with and without prior
    context (aligned and unaligned to blocks), shuffled into one batch."""
    requests = [(0, 1), (bs - 1, 1), (bs, 1), (3 * bs + 5, 1), (70, 1), (2 * bs + 9, 1),
                (0, 7), (0, 2 * bs + 3), (bs, 5), (13, 2 * bs + 1), (5 * bs + 3, bs)]
    order = np.random.default_rng(seed).permutation(len(requests))
    return [requests[i] for i in order]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_mixed_batch_matches_reference(group, head_size, block_size, dtype):
    seed = group * 1000 + head_size + block_size
    check_against_reference(*make_step(mixed_requests(block_size, seed), block_size=block_size,
                                       group=group, head_size=head_size, dtype=dtype,
                                       seed=seed))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_tiny_blocks(block_size, dtype):
    requests = [(0, 1), (1, 1), (2, 1), (9, 1), (0, 3), (0, 11), (1, 2), (6, 5), (17, 1)]
    check_against_reference(*make_step(requests, block_size=block_size, num_kv_heads=3,
                                       group=3, dtype=dtype, seed=block_size))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("window", [1, 5, 16, 40])
def test_sliding_window(window, block_size, dtype):
    requests = [(0, 1), (3, 1), (window, 1), (window + 2 * block_size + 3, 1), (100, 1),
                (0, 3), (0, window + 9), (0, 60), (7, 30), (window + 11, 4), (90, 17)]
    order = np.random.default_rng(window).permutation(len(requests))
    check_against_reference(*make_step([requests[i] for i in order], block_size=block_size,
                                       group=3, dtype=dtype, sliding_window=window,
                                       seed=window + block_size))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_pure_decode_batch_in_order(dtype):
    """The common step: only decodes, in token order, equal or close contexts (one group)."""
    for requests in ([(255, 1)] * 8, [(250 + i, 1) for i in range(8)], [(40, 1)]):
        step = make_step(requests, block_size=16, num_kv_heads=3, group=3, dtype=dtype,
                         seed=len(requests))
        check_against_reference(*step)
        meta = check_against_reference(*step, backend=gather_backend(step[0]))
        assert len(meta.decode_groups) == 1 and meta.decode_groups[0].in_order
        assert not meta.prefills


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_groups_split_by_length_and_size(dtype):
    """Very different contexts are split into groups (less padding); a tiny size cap cuts
    the batch further. Either way the answer is the reference's."""
    requests = [(c, 1) for c in (700, 3, 520, 64, 690, 9, 300, 511, 0, 130)]
    step = make_step(requests, block_size=16, num_kv_heads=3, group=3, dtype=dtype, seed=7)
    check_against_reference(*step)
    meta = check_against_reference(*step, backend=gather_backend(step[0]))
    assert len(meta.decode_groups) > 1
    assert sorted(int(i) for g in meta.decode_groups for i in g.token_idx) == list(range(10))
    capped = gather_backend(step[0])
    capped.max_group_bytes = 1
    meta = check_against_reference(*step, backend=capped)
    assert len(meta.decode_groups) == len(requests)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_blocks_written_in_this_step_are_read_by_others(dtype):
    """Prefix sharing: a decode and a prefill chunk read blocks that a prefill writes in the
    same step; every write lands before any read."""
    bs = 4
    requests = [(0, 3 * bs), (2 * bs + 1, 1), (2 * bs, 6), (5, 1)]
    shared = {1: (0, 2), 2: (0, 2)}
    check_against_reference(*make_step(requests, block_size=bs, group=4, dtype=dtype,
                                       seed=3, shared=shared))


def test_query_dtype_may_differ_from_cache_dtype():
    spec, common, layers, caches = make_step(mixed_requests(16, 5), block_size=16,
                                             dtype="bfloat16", seed=5)
    layers = [(q.float(), k.float(), v.float()) for q, k, v in layers]
    ref, fast = TorchReferenceBackend(spec), CpuPagedAttentionBackend(spec)
    for (q, k, v), cache in zip(layers, caches):
        ref_cache, fast_cache = cache.clone(), cache.clone()
        expected = ref.forward(q, k, v, ref_cache, ref.build_metadata(common, "cpu"))
        out = fast.forward(q, k, v, fast_cache, fast.build_metadata(common, "cpu"))
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, expected, atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(fast_cache, ref_cache, atol=0, rtol=0, equal_nan=True)


def test_same_cache_layout_as_reference_and_registered():
    from kvport.platforms.registry import PluginRegistry
    assert CpuPagedAttentionBackend.kv_cache_shape(10, 16, 3, 64) == \
        TorchReferenceBackend.kv_cache_shape(10, 16, 3, 64)
    assert CpuPagedAttentionBackend.page_bytes(16, 3, 64, 2) == \
        TorchReferenceBackend.page_bytes(16, 3, 64, 2)
    assert PluginRegistry().attention_backend_class("cpu_paged", "cpu") is \
        CpuPagedAttentionBackend


# End to end: greedy tokens of a tiny random model are the reference backend's. -----------

PROMPTS = [[(7 * i + j * j) % 300 + 3 for j in range(5 + 11 * i)] for i in range(8)]


def generate(path, backend, prompts=PROMPTS, max_tokens=24, **kw):
    from kvport import LLM, SamplingParams
    kw.setdefault("num_blocks", 256)
    kw.setdefault("max_model_len", 1024)
    llm = LLM(path, device="cpu", dtype="float32", attention_backend=backend, **kw)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("engine_kw", [
    {},
    # Small blocks, prefix caching and chunked prefill: prefill chunks with prior context.
    {"block_size": 4, "enable_prefix_caching": True, "max_num_batched_tokens": 32},
])
def test_greedy_tokens_match_reference_backend(tiny_llama_dir, engine_kw):
    prompts = PROMPTS + [PROMPTS[5][:40] + [11, 12, 13]]     # shares a prefix with PROMPTS[5]
    expected = generate(tiny_llama_dir, "torch_reference", prompts, **engine_kw)
    assert generate(tiny_llama_dir, "cpu_paged", prompts, **engine_kw) == expected


def test_greedy_tokens_match_reference_backend_sliding_window(tmp_path):
    from conftest import build_tiny_model
    path = build_tiny_model(str(tmp_path / "mistral"), "mistral", sliding_window=8)
    expected = generate(path, "torch_reference", max_tokens=16, block_size=4)
    assert generate(path, "cpu_paged", max_tokens=16, block_size=4) == expected
