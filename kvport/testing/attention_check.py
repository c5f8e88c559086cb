"""Run one AttentionCase through a backend and the torch reference; explain any difference.

torch is imported here, so only the torch-based checks import this module.
"""
from __future__ import annotations

import numpy as np
import torch

from kvport.attention_backends.torch_reference import TorchReferenceBackend
from kvport.testing.attention_cases import (NUM_LAYERS, TOLERANCE, AttentionCase, Step,
                                            block_tables, case_steps)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BackendMismatch(AssertionError):
    """The backend's output differs from the reference's; the message says where."""


def run_case(backend_class: type, case: AttentionCase, device, seed: int) -> None:
    """Raise BackendMismatch (or another AssertionError) when the backend is wrong."""
    spec = case.spec()
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    dtype = TORCH_DTYPES[case.dtype]
    tables, num_blocks = block_tables(case, rng)
    steps = case_steps(case, tables, rng)
    backend, reference = backend_class(spec), TorchReferenceBackend(spec)

    def randn(*shape):   # on the CPU with our generator, so every device sees the same data
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)

    kv_shape = backend.kv_cache_shape(num_blocks, case.block_size, case.num_kv_heads,
                                      case.head_size)
    ref_shape = reference.kv_cache_shape(num_blocks, case.block_size, case.num_kv_heads,
                                         case.head_size)
    # Random stale values, never zeros: reading a slot nobody wrote changes the result.
    caches = [randn(*kv_shape).to(device) for _ in range(NUM_LAYERS)]
    ref_caches = [randn(*ref_shape) for _ in range(NUM_LAYERS)]
    for step in steps:
        metadata = backend.build_metadata(step.common, device)
        ref_metadata = reference.build_metadata(step.common, "cpu")
        T = step.common.num_tokens
        for layer in range(NUM_LAYERS):
            q = randn(T, spec.num_heads, spec.head_size)
            k, v = randn(T, spec.num_kv_heads, spec.head_size), randn(T, spec.num_kv_heads,
                                                                      spec.head_size)
            expected = reference.forward(q, k, v, ref_caches[layer], ref_metadata)
            out = backend.forward(q.to(device), k.to(device), v.to(device), caches[layer],
                                  metadata)
            compare(out, expected, case, step, layer, backend_class.name or
                    backend_class.__name__)


def compare(out, expected: torch.Tensor, case: AttentionCase, step: Step, layer: int,
            name: str) -> None:
    """Shape, dtype, finiteness, then values within the dtype's tolerance."""
    where = f"{case.describe()}\n  in the {step.label}, layer {layer + 1} of {NUM_LAYERS}"
    if not isinstance(out, torch.Tensor):
        raise AssertionError(f"attention backend {name!r} returned {type(out).__name__}, not "
                             f"a torch.Tensor\n  case: {where}")
    if tuple(out.shape) != tuple(expected.shape):
        raise AssertionError(
            f"attention backend {name!r} returned shape {tuple(out.shape)}; expected "
            f"{tuple(expected.shape)} = [num_tokens, num_heads * head_size]\n  case: {where}")
    if out.dtype != expected.dtype:
        raise AssertionError(f"attention backend {name!r} returned {out.dtype}; the output "
                             f"must have the query's dtype {expected.dtype}\n  case: {where}")
    got, want = out.detach().float().cpu(), expected.float()
    atol, rtol = TOLERANCE[case.dtype]
    bad = ~(torch.isfinite(got) & ((got - want).abs() <= atol + rtol * want.abs()))
    if bad.any():
        raise BackendMismatch(explain(got, want, bad, case, step, name, where))


def explain(got: torch.Tensor, want: torch.Tensor, bad: torch.Tensor, case: AttentionCase,
            step: Step, name: str, where: str) -> str:
    """Which tokens, requests and heads are wrong, and by how much."""
    atol, rtol = TOLERANCE[case.dtype]
    err = torch.where(torch.isfinite(got), (got - want).abs(), torch.full_like(got, float("inf")))
    excess = (err - (atol + rtol * want.abs())).masked_fill(~bad, float("-inf"))
    flat = int(excess.argmax())
    token, column = divmod(flat, got.shape[1])
    head = column // case.head_size
    qsl = step.common.query_start_loc
    bad_tokens = bad.any(dim=1).nonzero().flatten().tolist()
    rows = sorted({int(np.searchsorted(qsl, t, side="right") - 1) for t in bad_tokens})
    row = int(np.searchsorted(qsl, token, side="right") - 1)
    wrong = ", ".join(_request_text(step, r, case) for r in rows[:8])
    more = f" and {len(rows) - 8} more" if len(rows) > 8 else ""
    heads = sorted({int(c) // case.head_size
                    for c in bad.any(dim=0).nonzero().flatten().tolist()})
    return (f"attention backend {name!r} differs from torch_reference\n"
            f"  case: {where}\n"
            f"  {int(bad.sum())} of {bad.numel()} output values are off (tolerance for "
            f"{case.dtype}: |out - ref| <= {atol} + {rtol} * |ref|); largest at token {token}, "
            f"head {head}: backend {got[token, column].item():.6g}, reference "
            f"{want[token, column].item():.6g} (|error| {err[token, column].item():.3g})\n"
            f"  token {token} belongs to {_request_text(step, row, case)}\n"
            f"  wrong requests: {wrong}{more}\n"
            f"  wrong heads: {heads} of {case.num_heads}")


def _request_text(step: Step, row: int, case: AttentionCase) -> str:
    req = step.rows[row]
    start = step.starts[row]
    count = int(step.common.query_start_loc[row + 1] - step.common.query_start_loc[row])
    kind = "decode" if count == 1 else "prefill chunk"
    return (f"request {req} ({kind}: {count} new token(s) at positions {start}..."
            f"{start + count - 1} after {start} tokens of context)")
