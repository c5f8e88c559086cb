"""The Triton paged-attention kernels against the torch reference: in Triton's CPU
interpreter where there is no GPU (CI), compiled on the GPU where there is one.

A small grid that CI can afford (the interpreter runs each program in numpy): both kernel
paths (mixed batches through the unified kernel, pure decode through the split-KV kernel),
GQA, a sliding window, block tables shared between requests, several KV tiles per block and
several blocks per tile. tests/gpu/ runs the full grid on a GPU.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (scripts/install.sh --test installs it)",
                allow_module_level=True)
import torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    # Before the kernels are defined: it makes @triton.jit build interpreted kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvport.attention_backends import triton_paged  # noqa: E402
from kvport.attention_backends.triton_paged import (TritonLaunchConfig,  # noqa: E402
                                                    TritonPagedAttentionBackend)
from paged_cases import MAX_REL_ERR, compare_with_reference, random_step  # noqa: E402

if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU, and TRITON_INTERPRET is set to something other than 1",
                allow_module_level=True)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(triton_paged, "_empty", nan_empty)


def small_tiles(**overrides) -> type[TritonPagedAttentionBackend]:
    """The backend with small tiles, so tiny steps still cross tile and block edges."""
    launch = dataclasses.replace(TritonLaunchConfig(prefill_block_m=16, prefill_block_n=16,
                                                    decode_block_n=16, min_split_tokens=16),
                                 **overrides)
    # A fixed SM count keeps the split-KV choice the same on every device.
    return type("SmallTileTriton", (TritonPagedAttentionBackend,),
                {"launch": launch, "sm_count": lambda self, device: 4})


MIXED = [(0, 9), (40, 1), (3, 1), (21, 7), (0, 1), (33, 1)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 1)])
def test_mixed_batch_matches_reference(dtype, heads, kv_heads):
    step = random_step(MIXED, num_heads=heads, num_kv_heads=kv_heads, head_size=32,
                       block_size=8, dtype=dtype, seed=hash((dtype, heads)) % 2**31,
                       device=DEVICE)
    backend = small_tiles()(step.spec)
    assert not backend.build_metadata(step.common, DEVICE).decode_only
    err, _ = compare_with_reference(backend, step)
    assert err < MAX_REL_ERR[dtype], err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_split_kv_decode_matches_reference(dtype):
    """Pure decode: several splits per request, some of them empty for short contexts."""
    step = random_step([(70, 1), (5, 1), (129, 1)], num_heads=4, num_kv_heads=2,
                       head_size=16, block_size=16, dtype=dtype, seed=7, device=DEVICE)
    backend = small_tiles(decode_programs_per_sm=8)(step.spec)
    metadata = backend.build_metadata(step.common, DEVICE)
    assert metadata.decode_only and metadata.num_splits == 4
    err, _ = compare_with_reference(backend, step)
    assert err < MAX_REL_ERR[dtype], err


def test_unsplit_decode_with_tiles_spanning_blocks():
    step = random_step([(50, 1), (17, 1)], num_heads=8, num_kv_heads=2, head_size=32,
                       block_size=8, seed=3, device=DEVICE)
    backend = small_tiles(decode_block_n=32, max_splits=1)(step.spec)
    assert backend.build_metadata(step.common, DEVICE).num_splits == 1
    err, _ = compare_with_reference(backend, step)
    assert err < MAX_REL_ERR["float32"], err


@pytest.mark.parametrize("requests", [MIXED, [(30, 1), (12, 1), (47, 1)]], ids=["mixed", "decode"])
def test_sliding_window(requests):
    step = random_step(requests, num_heads=4, num_kv_heads=2, head_size=16, block_size=8,
                       sliding_window=11, seed=11, device=DEVICE)
    err, _ = compare_with_reference(small_tiles()(step.spec), step)
    assert err < MAX_REL_ERR["float32"], err


def test_prefix_sharing_within_one_step():
    """Request 1 reads blocks that request 0 writes in the same step."""
    step = random_step([(0, 20), (16, 4)], num_heads=2, num_kv_heads=1, head_size=16,
                       block_size=8, seed=5, shared={1: (0, 2)}, device=DEVICE)
    err, _ = compare_with_reference(small_tiles()(step.spec), step)
    assert err < MAX_REL_ERR["float32"], err


def test_rejects_unsupported_shapes():
    from kvport.attention_backends.interface import AttentionSpec, UnsupportedAttentionConfig

    with pytest.raises(UnsupportedAttentionConfig, match="head size 40"):
        TritonPagedAttentionBackend(AttentionSpec(4, 2, 40, 16, "bfloat16", 0.1))
    with pytest.raises(UnsupportedAttentionConfig, match="block size 4"):
        TritonPagedAttentionBackend(AttentionSpec(4, 2, 64, 4, "bfloat16", 0.1))
