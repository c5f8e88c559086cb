"""Qwen3 (dense): the Llama decoder with a per-head RMSNorm on q and k before RoPE and an
explicit head_dim (read by the base class); biases follow `attention_bias`, and the sliding
window only applies when the config sets `use_sliding_window`."""
from __future__ import annotations

from kvport.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
    sliding_window_needs_flag = True
