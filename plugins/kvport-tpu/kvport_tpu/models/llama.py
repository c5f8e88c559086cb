"""The Llama decoder in JAX: Llama 2/3.x, SmolLM2, Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm).

    embed -> L x [RMSNorm -> attention (fused qkv, RoPE, ragged paged attention) -> residual
                  RMSNorm -> gated SiLU MLP (fused gate/up) -> residual] -> RMSNorm -> lm_head

The same architecture and class hooks as kvport/models/llama.py, written as pure functions
over a parameter pytree so one jitted step runs the whole model. Layers are stacked
([L, ...] leaves) and run by `lax.scan`: XLA compiles one layer, not L of them. The KV cache
of all layers travels through the scan as one array, updated in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import jax.numpy as jnp
from jax import lax

from kvport.core.model_info import uniform_sliding_window
from kvport.core.rope import RopeConfig, parse_rope_config
from kvport_tpu.models.layers import apply_rotary, gated_mlp, linear, rms_norm

# attend(query [T, H, d], key [T, kvh, d], value, kv_cache, layer) -> ([T, H * d], kv_cache)
AttendFn = Callable[..., tuple[jnp.ndarray, jnp.ndarray]]


@dataclass(frozen=True)
class LlamaSpec:
    """The static shape of a model (hashable: part of the jitted step's identity)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    eps: float
    qkv_bias: bool
    o_proj_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    sliding_window: int | None
    rope: RopeConfig

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_size

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_size


class LlamaForCausalLM:
    """Generic Llama-style decoder. Subclass hooks, as in the torch model:
    qkv_bias / o_proj_bias: None reads `attention_bias` from the config, a bool forces it;
    qk_norm: per-head RMSNorm on q and k before RoPE (Qwen3); sliding_window_needs_flag: the
    window applies only with `use_sliding_window` (Qwen).
    """
    qkv_bias: ClassVar[bool | None] = None
    o_proj_bias: ClassVar[bool | None] = None
    qk_norm: ClassVar[bool] = False
    sliding_window_needs_flag: ClassVar[bool] = False

    def __init__(self, hf_config: dict[str, Any]):
        cfg = hf_config
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}; supported: silu")
        if cfg.get("mlp_bias"):
            raise ValueError("mlp_bias is not supported by the JAX Llama model")
        hidden, num_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        num_layers = int(cfg["num_hidden_layers"])
        attention_bias = bool(cfg.get("attention_bias", False))
        self.spec = LlamaSpec(
            vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]), num_layers=num_layers,
            num_heads=num_heads, num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_size=int(cfg.get("head_dim") or hidden // num_heads),
            eps=float(cfg.get("rms_norm_eps", 1e-6)),
            qkv_bias=attention_bias if self.qkv_bias is None else self.qkv_bias,
            o_proj_bias=attention_bias if self.o_proj_bias is None else self.o_proj_bias,
            qk_norm=self.qk_norm,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=uniform_sliding_window(cfg, num_layers,
                                                  self.sliding_window_needs_flag),
            rope=parse_rope_config(cfg))

    # -- the step ---------------------------------------------------------------------------

    def forward(self, params: dict, kv_cache: jnp.ndarray, input_ids: jnp.ndarray,
                cos: jnp.ndarray, sin: jnp.ndarray,
                attend: AttendFn) -> tuple[jnp.ndarray, jnp.ndarray]:
        """input_ids [T], cos/sin [T, D/2] (float32, this step's positions) ->
        (final-norm hidden [T, hidden], updated kv_cache)."""
        spec = self.spec
        x = params["embed"][input_ids]                                # [T, hidden]
        cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)

        def layer(carry, inputs):
            x, residual, cache = carry
            lp, index = inputs
            # x is the previous layer's output, residual the stream before it
            stream = x + residual
            attn, cache = self._attention(lp, rms_norm(stream, lp["input_norm"], spec.eps),
                                          cos, sin, cache, index, attend)
            stream = attn + stream
            out = gated_mlp(rms_norm(stream, lp["post_norm"], spec.eps), lp["gate_up"],
                            lp["down"])
            return (out, stream, cache), None

        init = (x, jnp.zeros_like(x), kv_cache)   # x + 0 == x exactly
        layers = (params["layers"], jnp.arange(spec.num_layers, dtype=jnp.int32))
        (x, residual, kv_cache), _ = lax.scan(layer, init, layers)
        return rms_norm(x + residual, params["norm"], spec.eps), kv_cache

    def _attention(self, lp: dict, x: jnp.ndarray, cos, sin, cache, index,
                   attend: AttendFn) -> tuple[jnp.ndarray, jnp.ndarray]:
        spec = self.spec
        T = x.shape[0]
        qkv = linear(x, lp["qkv"], lp.get("qkv_bias"))
        q, k, v = jnp.split(qkv, [spec.q_size, spec.q_size + spec.kv_size], axis=-1)
        q = q.reshape(T, spec.num_heads, spec.head_size)
        k = k.reshape(T, spec.num_kv_heads, spec.head_size)
        v = v.reshape(T, spec.num_kv_heads, spec.head_size)
        if spec.qk_norm:
            q, k = rms_norm(q, lp["q_norm"], spec.eps), rms_norm(k, lp["k_norm"], spec.eps)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out, cache = attend(q, k, v, cache, index)                    # [T, H * d]
        return linear(out, lp["o_proj"], lp.get("o_proj_bias")), cache

    def compute_logits(self, params: dict, hidden: jnp.ndarray) -> jnp.ndarray:
        """hidden [N, hidden] -> float32 logits [N, vocab] (in the model dtype, then widened,
        as the torch model does)."""
        if self.spec.tie_word_embeddings:
            precision = lax.Precision.HIGHEST if hidden.dtype == jnp.float32 else None
            logits = jnp.matmul(hidden, params["embed"].T, precision=precision)
        else:
            logits = linear(hidden, params["lm_head"])
        return logits.astype(jnp.float32)


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 / Qwen2.5: biased q/k/v projections (never o_proj); window only when flagged."""
    qkv_bias = True
    o_proj_bias = False
    sliding_window_needs_flag = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: per-head RMSNorm on q and k before RoPE; biases follow `attention_bias`."""
    qk_norm = True
    sliding_window_needs_flag = True


__all__ = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaSpec"]
