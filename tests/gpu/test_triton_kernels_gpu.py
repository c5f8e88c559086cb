"""The Triton paged-attention kernels against the torch reference on a GPU: the full grid.

dtype (bf16, fp16, fp32) x head size (64, 128, 256) x GQA ratio (1, 4, 8) x block size (16, 32)
on mixed prefill/decode batches and on pure decode batches (split-KV), plus contexts up to
32k, sliding windows, and the padded decode batches CUDA graphs run. Every case draws fresh
random inputs (tests/paged_cases.py), poisons the outputs with NaN, and checks the relative
error: bf16 < 1e-2, fp16 < 5e-3, fp32 < 1e-4 (IEEE float32 dots, no TF32). Each error is also
recorded; scripts/gpu_check.sh prints the worst per dtype.
"""
from __future__ import annotations

import json
import os
import time

import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU test: torch sees no GPU")

from kvport.attention_backends import triton_paged  # noqa: E402
from kvport.attention_backends.triton_paged import TritonPagedAttentionBackend  # noqa: E402
from paged_cases import (MAX_REL_ERR, compare_with_reference, random_step,  # noqa: E402
                         relative_error)

# (context, new tokens): prefill chunks with and without context, decodes of every length
# class around the tile and block edges, in one batch.
MIXED = [(0, 300), (1500, 1), (37, 1), (700, 130), (0, 1), (4100, 1), (90, 17), (2047, 1),
         (15, 2)]
DECODE = [(c, 1) for c in (0, 15, 16, 17, 63, 500, 1023, 4096, 9000)]
SEED = int(time.time()) % 100_000          # fresh inputs every run; printed on failure


@pytest.fixture(scope="module")
def errors():
    rows: list[dict] = []
    yield rows
    folder = os.environ.get("KVPORT_GPU_REPORT_DIR")
    if folder:
        os.makedirs(folder, exist_ok=True)
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")   # one file per xdist worker
        with open(os.path.join(folder, f"kernel_errors_{worker}.json"), "w") as f:
            json.dump({"seed": SEED, "cases": rows}, f, indent=1)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(triton_paged, "_empty", nan_empty)


def check(errors, label, requests, *, dtype, head_size, group, block_size, num_kv_heads=2,
          sliding_window=None, seed=SEED):
    step = random_step(requests, num_heads=num_kv_heads * group, num_kv_heads=num_kv_heads,
                       head_size=head_size, block_size=block_size, dtype=dtype,
                       sliding_window=sliding_window, device="cuda", seed=seed)
    backend = TritonPagedAttentionBackend(step.spec)
    metadata = backend.build_metadata(step.common, "cuda")
    err, _ = compare_with_reference(backend, step)
    errors.append(dict(case=label, dtype=dtype, head_size=head_size, group=group,
                       block_size=block_size, window=sliding_window,
                       splits=metadata.num_splits if metadata.decode_only else None,
                       rel_err=err))
    assert err < MAX_REL_ERR[dtype], f"{label}: relative error {err:.3g} (seed {seed})"


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_size", [64, 128, 256])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_grid(errors, dtype, head_size, group, block_size):
    for label, requests in (("mixed", MIXED), ("decode", DECODE)):
        check(errors, label, requests, dtype=dtype, head_size=head_size, group=group,
              block_size=block_size)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_long_contexts(errors, dtype, block_size):
    """Up to 32k keys: split-KV decode with few requests, and a prefill chunk on 32k."""
    shape = dict(dtype=dtype, head_size=128, group=4, block_size=block_size, num_kv_heads=8)
    check(errors, "decode-32k", [(32767, 1), (20000, 1), (0, 1), (8191, 1)], **shape)
    check(errors, "decode-32k-alone", [(32767, 1)], **shape)
    check(errors, "mixed-32k", [(32000, 256), (30000, 1), (0, 512), (12345, 1)], **shape)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_sliding_window(errors, dtype):
    for label, requests in (("mixed-window", MIXED), ("decode-window", DECODE)):
        check(errors, label, requests, dtype=dtype, head_size=128, group=4, block_size=16,
              sliding_window=1000)
        check(errors, label + "-small", requests, dtype=dtype, head_size=64, group=8,
              block_size=32, sliding_window=33)


def test_padded_decode_batch_writes_nothing_for_padding():
    """The CUDA-graph layout: rows past the batch have slot -1 and context 0; they must leave
    the KV cache alone and produce finite (zero) rows."""
    step = random_step([(40, 1), (700, 1), (5, 1)], num_heads=8, num_kv_heads=2, head_size=128,
                       block_size=16, dtype="bfloat16", device="cuda", seed=SEED)
    backend = TritonPagedAttentionBackend(step.spec)
    plain = backend.build_metadata(step.common, "cuda")
    pad = 5
    slots = torch.cat([plain.slot_mapping, torch.full((pad,), -1, dtype=torch.int32,
                                                       device="cuda")])
    seq_lens = torch.cat([plain.seq_lens, torch.zeros(pad, dtype=torch.int32, device="cuda")])
    table = torch.cat([plain.block_table, torch.zeros(pad, plain.block_table.shape[1],
                                                      dtype=torch.int32, device="cuda")])
    padded = backend.decode_metadata(slots, seq_lens, table, num_splits=4)

    def extend(x):
        return torch.cat([x, torch.randn(pad, *x.shape[1:], device="cuda").to(x.dtype)])

    cache, reference_cache = step.cache.clone(), step.cache.clone()
    out = backend.forward(extend(step.query), extend(step.key), extend(step.value), cache, padded)
    expected = backend.forward(step.query, step.key, step.value, reference_cache, plain)
    assert torch.equal(cache.nan_to_num(7.0), reference_cache.nan_to_num(7.0))
    assert relative_error(out[:3], expected) < MAX_REL_ERR["bfloat16"]
    assert torch.all(out[3:] == 0)
