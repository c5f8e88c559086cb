"""The CPU plugin's native decode op (kvport_cpu/csrc/paged_decode.cpp) against the torch
reference, alone and inside cpu_paged.

The op is built on first use (kvport_cpu/native.py); the first test to need it pays the
build (~25 s on 2 cores, once per source change: torch caches it on disk). These tests skip
only when the op cannot be built, and say why.

Fresh random data everywhere: randn caches whose block 0 (which no request owns; block
tables are padded with 0) holds NaN, shuffled block tables, NaN-filled outputs, so a read
outside a request's blocks or an element left unwritten shows up as NaN.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvport.attention_backends.torch_reference import TorchReferenceBackend
from kvport_cpu import native
from kvport_cpu.attention import CpuPagedAttentionBackend
from test_cpu_attention import (check_against_reference, generate, make_step,  # noqa: F401
                                mixed_requests, poison_uninitialised_buffers)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(scope="module")
def paged_decode_out():
    built = native.paged_decode_op()
    if built.out is None:
        pytest.skip(f"native paged_decode unavailable: {built.reason}")
    return built.out


def decode_step(contexts, **kw):
    """A step of single-query requests with these prior contexts: the reference backend
    writes the new keys/values and attends; returns what the op needs and the expected
    [n, H, D] output."""
    spec, common, layers, caches = make_step([(c, 1) for c in contexts], **kw)
    (q, k, v), cache = layers[0], caches[0]
    q = q.float()                       # the op's query is float32 whatever the cache dtype
    ref = TorchReferenceBackend(spec)
    expected = ref.forward(q, k, v, cache, ref.build_metadata(common, "cpu"))
    return spec, common, q, cache, expected.view(q.shape)


def run_op(op, spec, common, q, cache, table_dtype=np.int64):
    out = torch.full(q.shape, float("nan"))
    op(out, q, cache, torch.from_numpy(common.block_table.astype(table_dtype)),
       torch.from_numpy(common.seq_lens.astype(np.int64)), spec.scale, spec.sliding_window)
    assert not out.isnan().any(), "unwritten or NaN output elements"
    return out


CONTEXTS = [0, 1, 14, 15, 16, 31, 100, 257, 2999]      # prior tokens: seq_lens 1 .. 3000


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_size", [64, 128, 80])   # 80: the plain-loop path
@pytest.mark.parametrize("group", [1, 3, 4])
def test_op_matches_reference(paged_decode_out, group, head_size, block_size, dtype):
    seed = group * 1000 + head_size + block_size
    contexts = list(np.random.default_rng(seed).permutation(CONTEXTS))
    step = decode_step(contexts, block_size=block_size, num_kv_heads=2, group=group,
                       head_size=head_size, dtype=dtype, seed=seed)
    out = run_op(paged_decode_out, *step[:4], table_dtype=np.int32 if group == 3 else np.int64)
    # Same float32 math on the same (cache-dtype) values, in another order.
    torch.testing.assert_close(out, step[4], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("window", [1, 5, 16, 40, 1000])
def test_op_sliding_window(paged_decode_out, window, dtype):
    contexts = [0, 3, window - 1, window, window + 35, 200, 1500]
    step = decode_step(contexts, block_size=16, num_kv_heads=3, group=3, dtype=dtype,
                       sliding_window=window, seed=window)
    torch.testing.assert_close(run_op(paged_decode_out, *step[:4]), step[4],
                               atol=1e-5, rtol=1e-5)


def test_op_uses_every_thread_count(paged_decode_out):
    """Work is split by request, or by KV head when requests are fewer than threads: the
    answer must not depend on the split."""
    step = decode_step([40, 700, 3], block_size=16, num_kv_heads=4, group=2, seed=11)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3, 8):
            torch.set_num_threads(n)
            torch.testing.assert_close(run_op(paged_decode_out, *step[:4]), step[4],
                                       atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_op_rejects_bad_input(paged_decode_out):
    spec, common, q, cache, _ = decode_step([5, 20], block_size=16, seed=1)
    table = torch.from_numpy(common.block_table.astype(np.int64))
    lens = torch.from_numpy(common.seq_lens.astype(np.int64))
    out = torch.empty(q.shape)
    cases = [
        ((out, q.double(), cache, table, lens), "q must be float32"),
        ((out, q, cache.double(), table, lens), "kv_cache must be float32, bfloat16 or float16"),
        ((out, q, cache[0], table, lens), "kv_cache must be \\[2, num_blocks"),
        ((out, q[..., :32], cache, table, lens), "head size of q"),
        ((out, q, cache, table[:1], lens), "block_table must be"),
        ((out, q, cache, table.float(), lens), "integer tensors"),
        ((out, q, cache, table.clone().fill_(10**6), lens), "outside the cache"),
        ((out, q, cache, table, lens * 100), "does not fit the block table"),
        ((out.double(), q, cache, table, lens), "out must be a contiguous float32"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            paged_decode_out(*args, spec.scale, None)


# The backend on the native path. ------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("head_size", [64, 16])
@pytest.mark.parametrize("group", [1, 3])
def test_backend_mixed_steps_match_reference(paged_decode_out, group, head_size, dtype):
    """Decodes on the native op, prefill chunks (with and without context) on SDPA."""
    for block_size in (4, 16):
        seed = group + head_size + block_size
        spec, *step = make_step(mixed_requests(block_size, seed), block_size=block_size,
                                group=group, head_size=head_size, dtype=dtype, seed=seed)
        backend = CpuPagedAttentionBackend(spec)
        assert backend.decode_path == "native"
        meta = check_against_reference(spec, *step, backend=backend)
        assert meta.native_decode is not None and not meta.decode_groups and meta.prefills


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_backend_pure_decode_and_window(paged_decode_out, dtype):
    for requests, window in (([(255, 1)] * 8, None), ([(c, 1) for c in (0, 9, 70, 400)], 24)):
        spec, *step = make_step(requests, block_size=16, num_kv_heads=3, group=3, dtype=dtype,
                                sliding_window=window, seed=len(requests))
        meta = check_against_reference(spec, *step)
        assert meta.native_decode.in_order and not meta.prefills


def test_decode_path_is_visible_when_not_native(monkeypatch):
    spec, *step = make_step(mixed_requests(16, 3), block_size=16, seed=3)
    off = CpuPagedAttentionBackend(spec)
    off.use_native_decode = False
    assert off.decode_path == "gather+sdpa (use_native_decode is False)"
    assert check_against_reference(spec, *step, backend=off).native_decode is None

    monkeypatch.setattr(native, "paged_decode_op",
                        lambda: native.NativeOp(None, reason="no C++ compiler ('c++' not found)"))
    unavailable = CpuPagedAttentionBackend(spec)
    assert unavailable.decode_path == ("gather+sdpa (native decode unavailable: no C++ "
                                       "compiler ('c++' not found))")
    assert check_against_reference(spec, *step, backend=unavailable).decode_groups


def test_loader_reports_why_it_cannot_build(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert "no C++ compiler" in native._build("paged_decode")

    monkeypatch.delenv("CXX")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "broken.cpp").write_text('#error "deliberately broken"\n')
    monkeypatch.setattr(native, "_CSRC", str(csrc))
    reason = native._build("broken")
    assert reason.startswith("build failed")
    assert "deliberately broken" in reason and "build_error.log" in reason


# End to end: greedy tokens of tiny random models on both decode paths. -----------------

@pytest.mark.parametrize("family, overrides", [
    ("llama", {}),                                                 # head size 16
    ("mistral", dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                     sliding_window=24)),                          # head size 64, window
])
def test_greedy_tokens_match_gather_path(paged_decode_out, monkeypatch, tmp_path, family,
                                         overrides):
    from conftest import build_tiny_model
    path = build_tiny_model(str(tmp_path / family), family, **overrides)
    kw = dict(max_tokens=20, block_size=16, max_num_batched_tokens=64)  # chunked prefills too
    native_tokens = generate(path, "cpu_paged", **kw)
    monkeypatch.setattr(CpuPagedAttentionBackend, "use_native_decode", False)
    assert generate(path, "cpu_paged", **kw) == native_tokens


def test_a_build_killed_midway_does_not_block_the_next_start(paged_decode_out):
    """A process killed while building leaves torch's `lock` file in the build directory;
    torch alone would wait on it forever. The next process must remove it and load."""
    import os
    import subprocess
    import sys

    from torch.utils import cpp_extension
    build_dir = cpp_extension._get_build_directory(native._name("paged_decode"), verbose=False)
    lock = os.path.join(build_dir, "lock")
    open(lock, "w").close()                      # what a builder killed midway leaves
    try:
        code = ("import sys; from kvport_cpu import native; "
                "sys.exit(0 if native.paged_decode_op().op is not None else 1)")
        done = subprocess.run([sys.executable, "-c", code], timeout=240, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "left by a native build that was killed" in done.stderr
        assert not os.path.exists(lock)
    finally:
        if os.path.exists(lock):
            os.remove(lock)
