"""Building blocks of the JAX decoders: matmul, RMSNorm, rotary embedding, gated MLP.

Pure functions on arrays. Token layout as in the torch models: a step's tokens are
flattened ([T, hidden], per-head [T, heads, head_size]); no batch dimension.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kvport.core.rope import RopeConfig, rope_inv_freq


def linear(x: jnp.ndarray, weight: jnp.ndarray, bias: jnp.ndarray | None = None) -> jnp.ndarray:
    """x [T, in] @ weight [in, out] (+ bias). float32 weights multiply in full float32
    (GPUs would otherwise use TF32), others at the device's native precision."""
    precision = lax.Precision.HIGHEST if weight.dtype == jnp.float32 else None
    y = jnp.matmul(x, weight, precision=precision)
    return y if bias is None else y + bias


def rms_norm(x: jnp.ndarray, weight: jnp.ndarray, eps: float) -> jnp.ndarray:
    """x / rms(x) * weight, normalized in float32 like Hugging Face's LlamaRMSNorm."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def rope_tables(rope: RopeConfig, head_size: int,
                max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """Host float32 cos, sin [max_positions, head_size // 2], computed as transformers does
    (float32 angles position * inv_freq) and looked up by position in each step."""
    inv_freq = rope_inv_freq(rope, head_size)
    angles = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]
    return np.cos(angles), np.sin(angles)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Neox / HF "rotate_half" rotation. x [T, heads, D]; cos, sin [T, D/2] in x's dtype."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def gated_mlp(x: jnp.ndarray, gate_up: jnp.ndarray, down: jnp.ndarray) -> jnp.ndarray:
    """down(silu(gate(x)) * up(x)), gate and up fused into one [hidden, 2 * inter] matmul."""
    gate, up = jnp.split(linear(x, gate_up), 2, axis=-1)
    return linear(jax.nn.silu(gate) * up, down)
