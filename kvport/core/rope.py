"""Rotary position embedding parameters and inverse frequencies, numpy only.

Every worker reads rope parameters through `parse_rope_config`. The torch models compute the
frequencies in torch (kvport/models/layers.py); `rope_inv_freq` here serves workers that are
not torch (JAX). Both compute what transformers computes, in float32, so they agree with it
(and each other) bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# freq_factors: every inverse frequency divided by its own factor. GGUF files store Llama 3.x's
# rope scaling this way (the `rope_freqs` tensor), as llama.cpp applies it.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "freq_factors")
DEFAULT_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class RopeConfig:
    """The rotary parameters of a model, whichever transformers version wrote its config."""
    rope_type: str = "default"
    theta: float = DEFAULT_ROPE_THETA
    factor: float = 1.0                       # linear, llama3
    low_freq_factor: float = 1.0              # llama3
    high_freq_factor: float = 4.0             # llama3
    original_max_position_embeddings: int | None = None   # llama3
    freq_factors: tuple[float, ...] | None = None          # freq_factors: one per frequency


def parse_rope_config(hf_config: dict[str, Any]) -> RopeConfig:
    """Read rope settings from an HF-style config dict (4.x `rope_theta` + `rope_scaling`, or
    5.x `rope_parameters`). Raises ValueError for rope types kvport does not implement."""
    params = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ValueError(f"rope parameters must be a dict, got {params!r}")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope parameters "
                         f"({', '.join(params)}) are not supported by this model family")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: "
                         f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    partial = params.get("partial_rotary_factor", hf_config.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor {partial} is not supported (only 1.0)")
    theta = float(params.get("rope_theta") or hf_config.get("rope_theta") or DEFAULT_ROPE_THETA)
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type == "freq_factors":
        factors = params.get("freq_factors")
        if not factors or not all(float(f) > 0 for f in factors):
            raise ValueError("rope type 'freq_factors' needs a list of positive 'freq_factors'")
        return RopeConfig("freq_factors", theta, freq_factors=tuple(float(f) for f in factors))
    if "factor" not in params:
        raise ValueError(f"rope type {rope_type!r} needs a 'factor' in the rope parameters")
    if rope_type == "linear":
        return RopeConfig("linear", theta, factor=float(params["factor"]))
    original = (params.get("original_max_position_embeddings")
                or hf_config.get("original_max_position_embeddings")
                or hf_config.get("max_position_embeddings"))
    return RopeConfig("llama3", theta, factor=float(params["factor"]),
                      low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                      high_freq_factor=float(params.get("high_freq_factor", 4.0)),
                      original_max_position_embeddings=int(original))


def rope_inv_freq(rope: RopeConfig, head_size: int) -> np.ndarray:
    """[head_size // 2] float32 inverse frequencies, computed as transformers computes them."""
    f32 = np.float32
    exponents = np.arange(0, head_size, 2).astype(f32) / f32(head_size)
    # theta ** e rounded once from float64: torch's float32 pow is correctly rounded except
    # in rare last-ulp cases, and this matches it far more often than numpy's float32 pow.
    powers = np.power(np.float64(rope.theta), exponents.astype(np.float64)).astype(f32)
    inv_freq = f32(1.0) / powers
    if rope.rope_type == "linear":
        inv_freq = inv_freq / f32(rope.factor)
    elif rope.rope_type == "freq_factors":
        inv_freq = inv_freq / np.asarray(check_freq_factors(rope, head_size), dtype=f32)
    elif rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_freq_wavelen = old_len / rope.low_freq_factor
        high_freq_wavelen = old_len / rope.high_freq_factor
        wavelen = f32(2 * math.pi) / inv_freq
        # long wavelengths are divided by factor, short ones kept, the band between smoothed
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / f32(rope.factor), inv_freq)
        smooth = ((f32(old_len) / wavelen - f32(rope.low_freq_factor))
                  / f32(rope.high_freq_factor - rope.low_freq_factor))
        smoothed = (1 - smooth) * scaled / f32(rope.factor) + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled)
    return inv_freq.astype(f32)


def check_freq_factors(rope: RopeConfig, head_size: int) -> tuple[float, ...]:
    """The per-frequency factors, after checking there is one per rotated pair."""
    factors = rope.freq_factors or ()
    if len(factors) != head_size // 2:
        raise ValueError(f"rope freq_factors has {len(factors)} entries; head size {head_size} "
                         f"needs {head_size // 2}")
    return factors
