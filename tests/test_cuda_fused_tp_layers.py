"""kvport-cuda's swap of a Llama-family model onto the fused all-reduce + residual + norm
(kvport_cuda/fused_tp_layers.py), on the CPU with a stand-in for the fused kernel.

The kernel itself needs two GPUs and runs in `plugins/kvport-cuda/bench/all_reduce.py
--fused-norm-only` (scripts/gpu_check.sh tp; docs/benchmarks.md says where it ran). What is
checked here is the wiring: every row-parallel matmul's partial reaches the norm that sums
it, the model computes what it computed before the swap, a partial the kernel would not take
is summed as before, and a model of another layout is left alone.
"""
from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("triton") is None or importlib.util.find_spec("kvport_cuda") is None:
    pytest.skip("needs triton and kvport-cuda (scripts/install.sh --test installs both)",
                allow_module_level=True)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from kvport.attention_backends.interface import AttentionSpec, CommonAttentionMetadata  # noqa: E402
from kvport.attention_backends.torch_reference import TorchReferenceBackend  # noqa: E402
from kvport.core.model_info import resolve_model  # noqa: E402
from kvport.models.llama import LlamaForCausalLM  # noqa: E402
from kvport.models.loader import build_model  # noqa: E402
from kvport_cuda.fused_tp_layers import (AllReduceRMSNorm, PartialSumLinear,  # noqa: E402
                                         fuse_all_reduce_norms)

from conftest import build_tiny_model  # noqa: E402


class StandInFused:
    """The AllReduceNorm interface in plain torch for one rank (the sum of one partial is the
    partial), on the CPU; takes up to `max_rows` rows and counts the fused calls."""

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self.regions = [torch.empty(0), torch.empty(0)]
        self.fused_calls: list[int] = []                # the region of each call

    def stage_product(self, x, weight, region):
        rows = x.numel() // x.shape[-1]
        if rows > self.max_rows:
            return None
        self.regions[region] = x.reshape(rows, -1) @ weight.t()
        return self.regions[region]

    def holds(self, x, region):
        return x.numel() > 0 and x.data_ptr() == self.regions[region].data_ptr()

    def sum_partial(self, partial):
        return partial.clone()

    def all_reduce_add_rms_norm(self, partial, residual, weight, eps, region):
        self.fused_calls.append(region)
        summed = partial + residual
        x = summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x, summed


def _model(tmp_path, **overrides):
    info = resolve_model(build_tiny_model(str(tmp_path), "llama", seed=3, **overrides))
    spec = AttentionSpec(num_heads=info.num_heads, num_kv_heads=info.num_kv_heads,
                         head_size=info.head_size, block_size=16, dtype="float32",
                         scale=info.head_size ** -0.5)
    backend = TorchReferenceBackend(spec)
    return info, backend, build_model(info, LlamaForCausalLM, torch.float32, backend, "cpu")


def _forward(model, info, backend, tokens: int) -> torch.Tensor:
    """One prefill of `tokens` tokens of one request: the final hidden states."""
    cache = backend.kv_cache_shape(4, 16, info.num_kv_heads, info.head_size)
    caches = [torch.zeros(cache) for _ in range(info.num_layers)]
    metadata = backend.build_metadata(CommonAttentionMetadata(
        query_start_loc=np.array([0, tokens], np.int32), seq_lens=np.array([tokens], np.int32),
        block_table=np.array([[0, 1, 2, 3]], np.int32),
        slot_mapping=np.arange(tokens, dtype=np.int64)), "cpu")
    ids = torch.arange(tokens) % 200 + 5
    with torch.inference_mode():
        return model(ids, torch.arange(tokens), caches, metadata)


def test_swapped_model_computes_what_it_did(tmp_path):
    info, backend, model = _model(tmp_path)
    expected_small, expected_large = (_forward(model, info, backend, n) for n in (5, 40))
    fused = StandInFused(max_rows=8)
    layers = info.num_layers
    assert fuse_all_reduce_norms(model, fused) == 2 * layers
    inner = model.model
    assert all(isinstance(layer.self_attn.o_proj, PartialSumLinear)
               and isinstance(layer.mlp.down_proj, PartialSumLinear)
               and isinstance(layer.post_attention_layernorm, AllReduceRMSNorm)
               for layer in inner.layers)
    assert isinstance(inner.norm, AllReduceRMSNorm)
    assert not isinstance(inner.layers[0].input_layernorm, AllReduceRMSNorm)  # the embedding's
    assert inner.layers[0].self_attn.o_proj.weight is not None

    got = _forward(model, info, backend, 5)                  # 5 rows: every sum fused,
    assert fused.fused_calls == [0, 1] * layers              # the regions alternating
    torch.testing.assert_close(got, expected_small, atol=1e-5, rtol=1e-5)
    got = _forward(model, info, backend, 40)                 # 40 rows: summed as before
    assert len(fused.fused_calls) == 2 * layers
    torch.testing.assert_close(got, expected_large, atol=1e-5, rtol=1e-5)


def test_other_layouts_are_left_alone(tmp_path):
    _, _, model = _model(tmp_path, attention_bias=True)       # o_proj has a bias
    assert fuse_all_reduce_norms(model, StandInFused(max_rows=8)) == 0
    assert not isinstance(model.model.layers[0].self_attn.o_proj, PartialSumLinear)
    assert fuse_all_reduce_norms(torch.nn.Linear(2, 2), StandInFused(max_rows=8)) == 0
