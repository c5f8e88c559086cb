"""Qwen2 / Qwen2.5: the Llama decoder with biased q/k/v projections (never on o_proj), and a
sliding window only when the config sets `use_sliding_window`."""
from __future__ import annotations

from kvport.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
    o_proj_bias = False
    sliding_window_needs_flag = True
