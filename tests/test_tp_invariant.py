"""tp_invariant (kvport/models/invariant.py): a tiny bf16 model gives the same logits, bit for
bit, cut over 1, 2 or 4 tensor-parallel ranks, where the default numerics give other bits.

The ranks are threads (tests/tp_cases.py); the matmul is kvport-cuda's shape-invariant Triton
kernel, in Triton's interpreter on the CPU (on the GPU where there is one, but the model here
stays on the CPU: tests/gpu and plugins/kvport-cuda/bench/tp_numerics.py run it on a GPU).
"""
from __future__ import annotations

import threading

import pytest
import torch

from kvport.core.config import ConfigError, EngineConfig, ParallelConfig
from kvport.core.model_info import resolve_model
from kvport.models.invariant import make_tp_invariant
from kvport.models.llama import LlamaForCausalLM
from kvport.models.tp_group import TensorParallelGroup, pairwise_sum
from kvport.testing.thread_group import run_ranks

from conftest import build_tiny_model
from tp_cases import sharded_logits

PROMPTS = [[(11 * i + 3 * j) % 300 + 3 for j in range(3 + 5 * i)] for i in range(3)]
# 8 heads over 4 KV heads, so 1, 2 and 4 ranks cut them evenly; biases on every projection
# (row-parallel biases are added after the sum); tied embeddings as the LM head.
MODELS = {
    "llama-biases": dict(num_attention_heads=8, num_key_value_heads=4, attention_bias=True,
                         mlp_bias=True),
    "llama-tied": dict(num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True,
                       num_hidden_layers=3),
}


def _cpu_invariant_matmul():
    """kvport-cuda's kernel on CPU tensors: through Triton's interpreter here."""
    from triton_device import triton_device
    if triton_device("kvport_cuda").type != "cpu":
        pytest.skip("the model runs on the CPU here; on a GPU machine the GPU suite checks it")
    from kvport_cuda.invariant_matmul import invariant_linear
    lock = threading.Lock()

    def one_at_a_time(*args, **kwargs):
        # Triton's interpreter patches triton.language while a kernel runs: not thread-safe
        with lock:
            return invariant_linear(*args, **kwargs)
    return one_at_a_time


@pytest.fixture(scope="module", params=list(MODELS))
def tiny_info(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return resolve_model(build_tiny_model(str(folder), "llama", seed=3,
                                          **MODELS[request.param]))


def test_logits_are_identical_at_every_tensor_parallel_size(tiny_info):
    matmul = _cpu_invariant_matmul()
    one = sharded_logits(tiny_info, LlamaForCausalLM, 1, PROMPTS, torch.bfloat16,
                         invariant_matmul=matmul)
    for size in (2, 4):
        got = sharded_logits(tiny_info, LlamaForCausalLM, size, PROMPTS, torch.bfloat16,
                             invariant_matmul=matmul)
        for step, (a, b) in enumerate(zip(one, got)):
            assert a.dtype == b.dtype == torch.float32      # the LM head is not rounded
            assert torch.equal(a, b), (f"TP={size}, step {step}: largest difference "
                                       f"{(a - b).abs().max().item()}")


def test_default_numerics_move_with_the_size_and_the_mode_computes_the_same_model(tiny_info):
    """The control: without the mode TP=2 gives other bits than TP=1 (so the test above can
    fail), and the mode's logits are as close to float32's as the default bf16 ones are."""
    matmul = _cpu_invariant_matmul()
    default = [sharded_logits(tiny_info, LlamaForCausalLM, n, PROMPTS, torch.bfloat16)
               for n in (1, 2)]
    assert not all(torch.equal(a, b) for a, b in zip(*default))
    exact = torch.cat(sharded_logits(tiny_info, LlamaForCausalLM, 1, PROMPTS))
    mode = torch.cat(sharded_logits(tiny_info, LlamaForCausalLM, 1, PROMPTS, torch.bfloat16,
                                    invariant_matmul=matmul))
    error_default = (torch.cat(default[0]) - exact).abs().max().item()
    error_mode = (mode - exact).abs().max().item()
    assert error_mode <= 1.5 * error_default + 1e-3, (error_mode, error_default)
    assert torch.equal(mode.argmax(-1), exact.argmax(-1))


def _fake_matmul(x, weight, *, k_groups=1, out_dtype=None):
    return torch.nn.functional.linear(x.float(), weight.float()).to(out_dtype or x.dtype)


def test_uneven_shards_are_refused(tmp_path):
    # 6 heads over 3 KV heads: 2 ranks hold 4 and 2 query heads, so o_proj's K is cut 32/16
    info = resolve_model(build_tiny_model(str(tmp_path), "llama", num_attention_heads=6,
                                          num_key_value_heads=3, hidden_size=48))
    from kvport.core.tensor_parallel import HeadShard
    from kvport.models.loader import build_model
    from tp_cases import checkpoint_weights, tp_backend

    def rank_main(rank, group):
        heads = HeadShard.of(info.num_heads, info.num_kv_heads, 2, rank)
        model = build_model(info, LlamaForCausalLM, torch.float32, tp_backend(info, heads),
                            "cpu", weights=checkpoint_weights(info), model_kwargs={"tp": group})
        make_tp_invariant(model, _fake_matmul, group)

    with pytest.raises(ConfigError, match=r"must be cut into 8 equal groups and 2 equal rank "
                                          r"slices; this rank holds \[(0, 32|32, 48)\)"):
        run_ranks(2, rank_main, timeout_s=30)


def test_sizes_that_do_not_cut_the_tree_and_unknown_layers_are_refused():
    model = torch.nn.Module()
    with pytest.raises(ConfigError, match="tensor_parallel_size 3 does not cut a tree of 8"):
        make_tp_invariant(model, _fake_matmul, TensorParallelGroup(0, 3))
    model.proj = torch.nn.Linear(8, 8)
    model.lm_head = None
    with pytest.raises(ConfigError, match="Linear 'proj' is neither column- nor row-parallel"):
        make_tp_invariant(model, _fake_matmul, TensorParallelGroup(0, 1))


def test_config_rules():
    with pytest.raises(ConfigError, match="tp_invariant needs tensor_parallel_size 1, 2, 4 or 8"):
        ParallelConfig(tensor_parallel_size=3, tp_invariant=True).validate()
    with pytest.raises(ConfigError, match="tp_invariant and quantization int8 cannot"):
        EngineConfig.from_kwargs(tp_invariant=True, quantization="int8")
    config = EngineConfig.from_kwargs(tp_invariant=True, tensor_parallel_size=2)
    assert config.parallel.tp_invariant


def test_a_platform_without_the_kernels_refuses_the_mode():
    from kvport_cpu.platform import CpuPlatform
    with pytest.raises(ConfigError, match="tp_invariant is not supported on cpu"):
        CpuPlatform().check_and_update_config(EngineConfig.from_kwargs(tp_invariant=True))


def test_the_cuda_platform_offers_the_mode_and_rocm_does_not():
    pytest.importorskip("kvport_cuda")
    from kvport_cuda.platform import CudaPlatform
    from kvport_rocm.platform import RocmPlatform
    assert CudaPlatform.supports_tp_invariant(object.__new__(CudaPlatform))
    assert not RocmPlatform.supports_tp_invariant(object.__new__(RocmPlatform))


@pytest.mark.parametrize("flags, expected", [([], False), (["--tp-invariant"], True)])
def test_cli_switch_reaches_the_config(flags, expected):
    from kvport.api.cli import build_parser, engine_config_from_args
    config = engine_config_from_args(build_parser().parse_args(["serve", "-tp", "2", *flags]))
    assert config.parallel.tp_invariant is expected


def test_partials_are_summed_in_one_tree_on_every_rank():
    generator = torch.Generator().manual_seed(7)
    # mixed magnitudes, so that the order of float32 additions shows in the bits
    parts = [torch.randn(4096, generator=generator) * 10.0 ** (3 * r) for r in range(4)]
    tree = (parts[0] + parts[1]) + (parts[2] + parts[3])
    assert torch.equal(pairwise_sum(torch.stack(parts)), tree)
    assert not torch.equal(((parts[0] + parts[1]) + parts[2]) + parts[3], tree)   # control
    sums = run_ranks(4, lambda rank, group: group.sum_in_fixed_order(parts[rank].clone()))
    assert all(torch.equal(s, tree) for s in sums)
    two = run_ranks(2, lambda rank, group: group.sum_in_fixed_order(parts[rank].clone()))
    assert all(torch.equal(s, parts[0] + parts[1]) for s in two)
    with pytest.raises(ValueError, match="power-of-two count, got 3"):
        pairwise_sum(torch.stack(parts[:3]))


def test_split_kv_choice_counts_the_heads_it_is_told():
    pytest.importorskip("triton")
    from kvport.attention_backends.interface import AttentionSpec
    from kvport.attention_backends.triton_paged import TritonPagedAttentionBackend
    whole = TritonPagedAttentionBackend(AttentionSpec(32, 8, 128, 16, "bfloat16", 0.1))
    half = TritonPagedAttentionBackend(AttentionSpec(16, 4, 128, 16, "bfloat16", 0.1))
    cpu = torch.device("cpu")
    # 1 request, 16k tokens: the rank's 4 KV heads alone would ask for more splits
    assert half.num_splits(1, 16384, cpu) != whole.num_splits(1, 16384, cpu)
    half.split_kv_heads = 8
    assert half.num_splits(1, 16384, cpu) == whole.num_splits(1, 16384, cpu)
