"""Tensor-parallel sharding without processes: the shard arithmetic, and every rank's slice of a
tiny random model (built and loaded through the real loader) against the unsharded model.

The ranks run as threads of this process (kvport.testing.thread_group); their collectives go
through `ThreadGroup`, a double of TensorParallelGroup that sums / gathers in rank order. The real
torch.distributed (gloo) path runs end to end in tests/test_tensor_parallel.py.
"""
from __future__ import annotations

import pytest
import torch

from kvport.core.config import ConfigError
from kvport.core.model_info import resolve_model
from kvport.core.tensor_parallel import HeadShard, VocabShard, check_model_fits, split_evenly
from kvport.models.llama import LlamaForCausalLM
from kvport.models.loader import build_model
from kvport.models.qwen3 import Qwen3ForCausalLM
from kvport.models.tp_group import TensorParallelGroup

from conftest import build_tiny_model
from tp_cases import checkpoint_weights, run_steps, sharded_logits, tp_backend

# ------------------------------------------------------------------ shard arithmetic

@pytest.mark.parametrize("total,parts", [(9, 2), (3, 2), (1536, 2), (100, 3), (8, 8), (7, 4)])
def test_split_evenly_covers_everything_once(total, parts):
    pieces = [split_evenly(total, parts, i) for i in range(parts)]
    assert pieces[0][0] == 0
    for (start, count), (next_start, _) in zip(pieces, pieces[1:]):
        assert start + count == next_start
    assert sum(c for _, c in pieces) == total
    assert max(c for _, c in pieces) - min(c for _, c in pieces) <= 1


def test_head_shards_keep_whole_kv_groups():
    # SmolLM2: 9 heads over 3 KV heads; two ranks get 2 and 1 KV heads with their 3 queries
    shards = [HeadShard.of(9, 3, 2, r) for r in range(2)]
    assert [(s.kv_start, s.num_kv_heads) for s in shards] == [(0, 2), (2, 1)]
    assert [(s.q_start, s.num_heads) for s in shards] == [(0, 6), (6, 3)]
    # Llama-3.1-8B: 32 heads over 8 KV heads, evenly on 2 ranks
    assert HeadShard.of(32, 8, 2, 1) == HeadShard(q_start=16, num_heads=16, kv_start=4,
                                                  num_kv_heads=4)


def test_vocab_shards_are_padded_to_equal_widths():
    shards = [VocabShard.of(321, 2, r) for r in range(2)]
    assert [(s.start, s.count, s.padded) for s in shards] == [(0, 161, 161), (161, 160, 161)]
    assert VocabShard.of(128256, 2, 1) == VocabShard(start=64128, count=64128, padded=64128)


def test_model_must_have_a_kv_head_per_rank(tmp_path):
    info = resolve_model(build_tiny_model(str(tmp_path), "llama"))      # 4 heads, 2 KV heads
    check_model_fits(2, info)
    with pytest.raises(ConfigError, match=r"tensor_parallel_size 4 is larger than the model's "
                                          r"2 KV heads \(4 attention heads\)"):
        check_model_fits(4, info)


# ------------------------------------------------------------------ sharded model vs whole

CASES = {
    # uneven heads (3 KV heads on 2 ranks), biased o_proj (row-parallel bias), odd vocab
    "llama-uneven-heads": ("llama", LlamaForCausalLM, 2,
                           dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=48,
                                vocab_size=321, attention_bias=True, mlp_bias=True)),
    # tied embeddings as LM head, MLP channels and vocab not divisible by 3
    "llama-tied-3-ranks": ("llama", LlamaForCausalLM, 3,
                           dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=48,
                                intermediate_size=100, vocab_size=322,
                                tie_word_embeddings=True)),
    # per-head q/k norms (Qwen3)
    "qwen3": ("qwen3", Qwen3ForCausalLM, 2, dict(vocab_size=320)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_model_matches_the_whole_model(case, tmp_path):
    family, model_class, size, overrides = CASES[case]
    info = resolve_model(build_tiny_model(str(tmp_path), family, seed=5, **overrides))
    prompts = [[(11 * i + 3 * j) % 300 + 3 for j in range(3 + 5 * i)] for i in range(3)]
    whole = HeadShard.of(info.num_heads, info.num_kv_heads, 1, 0)
    model = build_model(info, model_class, torch.float32, tp_backend(info, whole), "cpu",
                        weights=checkpoint_weights(info))
    expected = run_steps(model, info, info.num_kv_heads, prompts)
    got = sharded_logits(info, model_class, size, prompts)
    for step_got, step_expected in zip(got, expected):
        assert step_got.shape == step_expected.shape == (len(prompts), info.vocab_size)
        torch.testing.assert_close(step_got, step_expected, atol=2e-5, rtol=2e-5)
        assert torch.equal(step_got.argmax(-1), step_expected.argmax(-1))


def test_float32_reduction_rounds_once_like_one_rank(tmp_path):
    """bf16: with tp_reduce_dtype float32 the row-parallel sums are rounded once, as the
    unsharded matmul rounds them, so TP=2's logits sit far closer to TP=1's than when each
    rank's part is rounded to bf16 before the sum."""
    info = resolve_model(build_tiny_model(str(tmp_path), "llama", seed=5, vocab_size=320,
                                          hidden_size=64, intermediate_size=192,
                                          num_hidden_layers=4))
    prompts = [[(11 * i + 3 * j) % 300 + 3 for j in range(3 + 5 * i)] for i in range(3)]
    whole = HeadShard.of(info.num_heads, info.num_kv_heads, 1, 0)
    model = build_model(info, LlamaForCausalLM, torch.bfloat16,
                        tp_backend(info, whole, "bfloat16"), "cpu",
                        weights=checkpoint_weights(info))
    expected = torch.cat(run_steps(model, info, info.num_kv_heads, prompts))
    errors = {}
    for in_float32 in (False, True):
        got = torch.cat(sharded_logits(info, LlamaForCausalLM, 2, prompts, torch.bfloat16,
                                        reduce_in_float32=in_float32))
        assert got.dtype == torch.float32 and got.shape == expected.shape
        errors[in_float32] = float((got - expected).abs().max())
    assert errors[True] < 0.5 * errors[False], errors


def test_checkpoint_shapes_are_checked_before_slicing(tmp_path):
    from kvport.models.weights import WeightLoadError, iter_weights
    info = resolve_model(build_tiny_model(str(tmp_path), "llama"))
    group = TensorParallelGroup(1, 2)          # never communicates: loading only
    heads = HeadShard.of(info.num_heads, info.num_kv_heads, 2, 1)
    with torch.device("meta"):
        model = LlamaForCausalLM(info.hf_config, tp_backend(info, heads), tp=group)
    model.to_empty(device="cpu")
    weights = [(n, t[:, :-1] if n.endswith("o_proj.weight") else t)
               for n, t in iter_weights(info)]
    with pytest.raises(WeightLoadError, match=r"o_proj\.weight has shape \(64, 63\), the model "
                                              r"expects \(64, 64\)"):
        model.load_weights(weights)
