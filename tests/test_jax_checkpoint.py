"""Torch-free checkpoint reading (kvport/core/checkpoint.py) and rope (kvport/core/rope.py)
give the JAX worker exactly what the torch loader gives the torch models; the JAX parameter
loader refuses checkpoints that do not fit."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kvport.core.checkpoint import CheckpointError, iter_numpy_weights
from kvport.core.model_info import resolve_model
from kvport.models.weights import iter_weights


def assert_same_tensors(numpy_pairs, torch_pairs):
    ours = dict(numpy_pairs)
    theirs = {name: t.float().numpy() for name, t in torch_pairs}
    assert sorted(ours) == sorted(theirs)
    for name, array in ours.items():
        assert array.dtype in (np.float32, np.float16), name
        np.testing.assert_array_equal(array.astype(np.float32), theirs[name], err_msg=name)


def test_safetensors_float32_equal_to_torch_loader(tiny_llama_dir):
    info = resolve_model(tiny_llama_dir)
    assert_same_tensors(iter_numpy_weights(info), iter_weights(info))


def test_safetensors_bfloat16_widened_exactly(tmp_path):
    from conftest import build_tiny_model
    path = build_tiny_model(str(tmp_path / "bf16"), "qwen2", seed=5)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    info = resolve_model(path)
    pairs = list(iter_numpy_weights(info))
    assert all(a.dtype == np.float32 for _, a in pairs)
    assert_same_tensors(pairs, iter_weights(info))
    assert any(np.abs(a).max() > 0 for _, a in pairs)


@pytest.mark.slow
def test_gguf_equal_to_torch_loader(smollm2_path):
    """SmolLM2's GGUF (Q4_1 and F32 tensors, llama-permuted q/k): the first blocks' tensors."""
    info = resolve_model(smollm2_path)
    count = 24   # the embeddings and the first two decoder blocks (q, k un-permuted)
    ours = list(itertools.islice(iter_numpy_weights(info), count))
    theirs = list(itertools.islice(iter_weights(info), count))
    assert any(".self_attn.q_proj." in name for name, _ in ours)
    assert_same_tensors(ours, theirs)


def test_jax_params_refuse_a_checkpoint_that_does_not_fit(tiny_llama_dir):
    import jax.numpy as jnp

    from kvport_tpu.models.llama import LlamaForCausalLM
    from kvport_tpu.models.params import load_params
    info = resolve_model(tiny_llama_dir)
    spec = LlamaForCausalLM(info.hf_config).spec
    pairs = list(iter_numpy_weights(info))
    params = load_params(spec, pairs, jnp.float32)
    q = dict(pairs)["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(np.asarray(params["layers"]["qkv"][1][:, :spec.q_size]), q.T)
    without = [(n, a) for n, a in pairs if n != "model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match="missing 1: .*gate_up"):
        load_params(spec, without, jnp.float32)
    extra = pairs + [("model.layers.0.mlp.extra.weight", q)]
    with pytest.raises(CheckpointError, match="unexpected 1: model.layers.0.mlp.extra.weight"):
        load_params(spec, extra, jnp.float32)
    wrong = [(n, a[:-1] if n == "model.norm.weight" else a) for n, a in pairs]
    with pytest.raises(CheckpointError, match="model.norm.weight has shape"):
        load_params(spec, wrong, jnp.float32)


@pytest.mark.parametrize("config", [
    {"rope_theta": 10000.0},
    {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 8192}},
    {"rope_theta": 100000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
])
def test_rope_frequencies_equal_to_torch(config):
    from kvport.core import rope
    from kvport.models import layers
    for head_size in (64, 128):
        ours = rope.rope_inv_freq(rope.parse_rope_config(config), head_size)
        theirs = layers.rope_inv_freq(layers.parse_rope_config(config), head_size).numpy()
        np.testing.assert_array_equal(ours, theirs)
