"""Rope scaling read from GGUF files: Llama 3.x's per-frequency factors (the `rope_freqs`
tensor llama.cpp's converter writes), linear scaling from metadata, and refusals of what
kvport does not implement. Before this, `rope_freqs` was skipped and a Llama 3.1 GGUF ran
with unscaled positions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvport.core.config import ConfigError
from kvport.core.gguf_metadata import read_gguf_config
from kvport.core.rope import RopeConfig, parse_rope_config, rope_inv_freq
from kvport.models.layers import rope_inv_freq as torch_rope_inv_freq

gguf = pytest.importorskip("gguf")

HEAD = 64
LLAMA31 = RopeConfig("llama3", 500000.0, factor=8.0, low_freq_factor=1.0,
                     high_freq_factor=4.0, original_max_position_embeddings=8192)


def llama_cpp_factors(rope: RopeConfig, head_size: int) -> np.ndarray:
    """The divisors llama.cpp's converter stores for Llama 3.x scaling (written out from its
    rule: 1 for short wavelengths, `factor` for long ones, a blend between)."""
    freqs = 1.0 / (rope.theta ** (np.arange(0, head_size, 2, dtype=np.float32) / head_size))
    low = rope.original_max_position_embeddings / rope.low_freq_factor
    high = rope.original_max_position_embeddings / rope.high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high:
            factors.append(1.0)
        elif wavelen > low:
            factors.append(rope.factor)
        else:
            smooth = ((rope.original_max_position_embeddings / wavelen - rope.low_freq_factor)
                      / (rope.high_freq_factor - rope.low_freq_factor))
            factors.append(1 / ((1 - smooth) / rope.factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def test_freq_factors_reproduce_llama3_scaling():
    factors = llama_cpp_factors(LLAMA31, HEAD)
    assert factors.min() == 1.0 and factors.max() == 8.0      # both ends and a blend exist
    rope = parse_rope_config({"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "freq_factors", "freq_factors": factors.tolist()}})
    expected = rope_inv_freq(LLAMA31, HEAD)
    np.testing.assert_allclose(rope_inv_freq(rope, HEAD), expected, rtol=1e-6)
    np.testing.assert_allclose(torch_rope_inv_freq(rope, HEAD).numpy(), expected, rtol=1e-6)
    assert not np.allclose(rope_inv_freq(RopeConfig(theta=500000.0), HEAD), expected)


def test_freq_factors_must_fit_the_head():
    rope = parse_rope_config({"rope_scaling": {"rope_type": "freq_factors",
                                               "freq_factors": [1.0] * 8}})
    with pytest.raises(ValueError, match="needs 32"):
        rope_inv_freq(rope, HEAD)
    with pytest.raises(ValueError, match="positive"):
        parse_rope_config({"rope_scaling": {"rope_type": "freq_factors",
                                            "freq_factors": [1.0, 0.0]}})


def write_gguf(path, scaling_type=None, factor=None, rope_freqs=None, rope_dims=HEAD):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(2048)
    writer.add_embedding_length(4 * HEAD)
    writer.add_feed_forward_length(8 * HEAD)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(500000.0)
    writer.add_rope_dimension_count(rope_dims)
    writer.add_layer_norm_rms_eps(1e-5)
    if scaling_type is not None:
        writer.add_rope_scaling_type(scaling_type)
    if factor is not None:
        writer.add_rope_scaling_factor(factor)
    writer.add_tensor("token_embd.weight", np.zeros((16, 4 * HEAD), dtype=np.float32))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_gguf_rope_freqs_tensor_becomes_the_config(tmp_path):
    factors = llama_cpp_factors(LLAMA31, HEAD)
    _, config = read_gguf_config(write_gguf(tmp_path / "m.gguf", rope_freqs=factors))
    assert config["rope_scaling"]["rope_type"] == "freq_factors"
    np.testing.assert_array_equal(np.float32(config["rope_scaling"]["freq_factors"]), factors)
    rope = parse_rope_config(config)
    np.testing.assert_allclose(rope_inv_freq(rope, HEAD), rope_inv_freq(LLAMA31, HEAD),
                               rtol=1e-6)


def test_gguf_linear_scaling_and_plain_rope(tmp_path):
    _, config = read_gguf_config(write_gguf(tmp_path / "lin.gguf", gguf.RopeScalingType.LINEAR,
                                            factor=4.0))
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    _, config = read_gguf_config(write_gguf(tmp_path / "plain.gguf"))
    assert "rope_scaling" not in config and parse_rope_config(config) == RopeConfig(theta=500000.0)


def test_gguf_rope_kinds_kvport_cannot_run_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="yarn"):
        read_gguf_config(write_gguf(tmp_path / "yarn.gguf", gguf.RopeScalingType.YARN,
                                    factor=4.0))
    _, config = read_gguf_config(write_gguf(tmp_path / "partial.gguf", rope_dims=HEAD // 2))
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        parse_rope_config(config)


def test_torch_cache_uses_the_factors():
    from kvport.models.layers import RotaryEmbedding
    factors = llama_cpp_factors(LLAMA31, HEAD)
    scaled = RotaryEmbedding(HEAD, 16, RopeConfig("freq_factors", 500000.0,
                                                  freq_factors=tuple(factors.tolist())))
    reference = RotaryEmbedding(HEAD, 16, LLAMA31)
    torch.testing.assert_close(scaled.cos_sin_cache, reference.cos_sin_cache, rtol=1e-5,
                               atol=1e-6)
