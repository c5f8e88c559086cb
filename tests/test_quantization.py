"""W8A8 dynamic int8 quantization (`--quantization int8`): the layer, the model, the config."""
from __future__ import annotations

import pytest
import torch

from kvport import LLM, SamplingParams
from kvport.core.config import ConfigError, EngineConfig
from kvport.models.quantization import (Int8DynamicLinear, int8_matmul_available,
                                        quantize_model)

pytestmark = pytest.mark.skipif(not int8_matmul_available(),
                                reason="this torch has no CPU int8 matmul (torch._int_mm)")


def _linear(k: int, n: int, bias: bool, seed: int) -> torch.nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) / k ** 0.5)
        if bias:
            linear.bias.copy_(torch.randn(n, generator=gen))
    return linear


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_int8_linear_close_to_float(rows, bias):
    linear = _linear(96, 80, bias, seed=rows)
    x = torch.randn(rows, 96)
    expected = linear(x)
    got = Int8DynamicLinear.from_linear(linear)(x)
    assert got.shape == expected.shape and got.dtype == x.dtype
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < 0.02, f"relative error {rel:.4f} for {rows} rows"


def test_int8_linear_keeps_leading_dims_and_dtype():
    linear = _linear(32, 48, True, seed=1)
    q = Int8DynamicLinear.from_linear(linear)
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    out = q(x)
    assert out.shape == (2, 3, 48) and out.dtype == torch.bfloat16


def test_rows_are_quantized_independently():
    """Per-token scales: a row's result does not depend on an outlier row beside it (one
    scale per tensor would crush the small row to a handful of int8 levels)."""
    q = Int8DynamicLinear.from_linear(_linear(64, 32, False, seed=2))
    small = torch.randn(1, 64) * 0.01
    outlier = torch.randn(1, 64) * 1000.0
    alone = q(small)
    batched = q(torch.cat([outlier, small]))[1:]
    assert torch.equal(alone, batched)
    expected = small @ q.qweight.float().t() * q.weight_scale
    assert ((alone - expected).norm() / expected.norm()).item() < 0.02


def test_quantize_model_replaces_every_linear_and_a_tied_head(tiny_llama_dir):
    from kvport.attention_backends.interface import AttentionSpec
    from kvport.attention_backends.torch_reference import TorchReferenceBackend
    from kvport.core.model_info import resolve_model
    from kvport.models.llama import LlamaForCausalLM
    from kvport.models.loader import build_model
    info = resolve_model(tiny_llama_dir)
    backend = TorchReferenceBackend(AttentionSpec(
        num_heads=info.num_heads, num_kv_heads=info.num_kv_heads, head_size=info.head_size,
        block_size=16, dtype="float32", scale=info.head_size ** -0.5))
    model = build_model(info, LlamaForCausalLM, torch.float32, backend, "cpu")
    hidden = torch.randn(5, int(info.hf_config["hidden_size"]))
    logits = model.compute_logits(hidden)
    replaced = quantize_model(model, "int8")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears
    # qkv, o, gate_up, down per layer, plus the LM head (its own, or the tied embedding's copy)
    assert replaced == 4 * info.num_layers + 1
    assert isinstance(model.lm_head, Int8DynamicLinear)
    q_logits = model.compute_logits(hidden)
    cos = torch.nn.functional.cosine_similarity(q_logits, logits, dim=-1)
    assert cos.min().item() > 0.99, cos


def test_unknown_quantization_method():
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        quantize_model(torch.nn.Linear(2, 2), "int4")


def test_config_rejects_unknown_quantization():
    with pytest.raises(ConfigError, match="quantization must be one of none, int8"):
        EngineConfig.from_kwargs(quantization="fp4").validate()
    assert EngineConfig.from_kwargs(quantization="none").validate().model.quantization is None


def test_platform_without_the_scheme_refuses_it():
    from kvport.platforms.interface import Platform

    class NoQuantPlatform(Platform):
        device_type = "fake"
        total_memory_bytes = free_memory_bytes = lambda self: 1
        supported_dtypes = lambda self: ("float32",)
        default_dtype = lambda self, checkpoint_dtype: "float32"
        distributed_backend = lambda self: "gloo"
        default_attention_backend = lambda self, config: "x"
        worker_class = lambda self: "x:Y"

    config = EngineConfig.from_kwargs(quantization="int8").validate()
    with pytest.raises(ConfigError, match="quantization int8 is not supported on fake; "
                                          "supported: none"):
        NoQuantPlatform().check_and_update_config(config)


def test_llm_serves_int8_close_to_float(tiny_llama_dir):
    """End to end on the CPU plugin: the quantized engine generates, its first greedy tokens
    follow the float model's on a tiny random model, and its KV blocks all come back."""
    prompts = [[5, 17, 99, 3, 42, 7], [8, 8, 120, 64, 1]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    def run(**kw):
        llm = LLM(tiny_llama_dir, device="cpu", dtype="float32", num_blocks=64,
                  max_model_len=256, **kw)
        outs = llm.generate(prompts, params)
        return llm, [list(o.outputs[0].token_ids) for o in outs]

    _, fp32 = run()
    llm, int8 = run(quantization="int8")
    assert all(len(t) == 8 for t in int8)
    assert [t[0] for t in int8] == [t[0] for t in fp32]
    assert llm.engine.snapshot().kv_cache_usage == 0.0
