"""Random paged-attention steps, and the check of a backend against the torch reference.

Used by the Triton kernel tests on the CPU interpreter (tests/test_triton_paged.py) and on a
GPU (tests/gpu/). A step is built from fresh random data every time: a randn-filled KV cache
(unwritten slots hold stale, finite values) whose block 0, which no request owns and which
pads every block table, holds NaN; shuffled, non-contiguous block tables; randn queries, keys
and values. The backend's output buffers are NaN-poisoned by the caller, so an unwritten
output element or a read outside a request's blocks shows up as NaN.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvport.attention_backends.interface import AttentionSpec, CommonAttentionMetadata
from kvport.attention_backends.torch_reference import TorchReferenceBackend

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Relative Frobenius error bars against the reference (issue 4's acceptance).
MAX_REL_ERR = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 5e-3}


@dataclass
class Step:
    spec: AttentionSpec
    common: CommonAttentionMetadata
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    cache: torch.Tensor


def random_step(requests: list[tuple[int, int]], *, num_heads: int, num_kv_heads: int,
                head_size: int, block_size: int, dtype: str = "float32",
                sliding_window: int | None = None, device="cpu", seed: int = 0,
                shared: dict[int, tuple[int, int]] | None = None) -> Step:
    """One step of `requests` [(context_len, query_len), ...] in batch order.

    shared: {request: (other request, n)}: the request's first n blocks are the other's
    (prefix sharing; the other one may be writing them in this very step).
    """
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    shared = shared or {}
    bs = block_size
    needed = [-(-(c + q) // bs) for c, q in requests]
    own = [n - shared[i][1] if i in shared else n for i, n in enumerate(needed)]
    num_blocks = 1 + sum(own) + 3                       # block 0 is never handed out
    free = list(rng.permutation(np.arange(1, num_blocks)))
    tables = [[int(free.pop()) for _ in range(n)] for n in own]
    for i, (src, n) in shared.items():
        tables[i] = tables[src][:n] + tables[i]
    block_table = np.zeros((len(requests), max(needed) + 2), dtype=np.int32)
    for i, t in enumerate(tables):
        block_table[i, :len(t)] = t
    qsl = np.zeros(len(requests) + 1, dtype=np.int32)
    qsl[1:] = np.cumsum([q for _, q in requests])
    slots = []
    for i, (c, q) in enumerate(requests):
        pos = np.arange(c, c + q)
        slots.append(block_table[i, pos // bs].astype(np.int64) * bs + pos % bs)
    common = CommonAttentionMetadata(
        query_start_loc=qsl, seq_lens=np.array([c + q for c, q in requests], dtype=np.int32),
        block_table=block_table, slot_mapping=np.concatenate(slots))
    spec = AttentionSpec(num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size,
                         block_size=bs, dtype=dtype, scale=head_size ** -0.5,
                         sliding_window=sliding_window)
    tdtype = DTYPES[dtype]

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(tdtype).to(device)

    cache = randn(2, num_blocks, bs, num_kv_heads, head_size)
    cache[:, 0] = float("nan")
    T = int(qsl[-1])
    return Step(spec, common, randn(T, num_heads, head_size), randn(T, num_kv_heads, head_size),
                randn(T, num_kv_heads, head_size), cache)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def compare_with_reference(backend, step: Step) -> tuple[float, torch.Tensor]:
    """Run `backend` and the torch reference on copies of the step's cache.

    Asserts the caches are identical afterwards (the KV write is a copy) and that the
    output has no NaN; returns (relative error, output)."""
    device = step.query.device
    ref_cache = step.cache.clone()
    reference = TorchReferenceBackend(step.spec)
    expected = reference.forward(step.query, step.key, step.value, ref_cache,
                                 reference.build_metadata(step.common, device))
    cache = step.cache.clone()
    out = backend.forward(step.query, step.key, step.value, cache,
                          backend.build_metadata(step.common, device))
    assert out.shape == expected.shape and out.dtype == step.query.dtype
    assert not torch.isnan(out).any(), "NaN in the output: an unwritten element or a bad read"
    assert torch.equal(cache.nan_to_num(7.0), ref_cache.nan_to_num(7.0)), \
        "the KV caches differ after the step"
    return relative_error(out, expected), out
