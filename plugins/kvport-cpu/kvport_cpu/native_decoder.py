"""Decode steps of Llama-family models in one native call (csrc/llama_decode.cpp).

At one token per step the model's ~190 torch ops per layer cost more in Python and dispatch
than in arithmetic (docs/benchmarks.md). `NativeDecodeModel` wraps the loaded model: a step
whose requests all have exactly one new token runs the decoder layers in C++ (the model's
own weights, float32 or kvport's W8A8 int8, no copies); every other step (prefill chunks,
mixed steps) runs the model itself. The embedding lookup and the LM head stay in the model.

`native_decoder_for` decides whether a model qualifies and says why not; the CPU worker logs
the answer, so the path taken is never silent.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvport.models.layers import GatedMLP
from kvport.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from kvport.models.quantization import Int8DynamicLinear


@dataclass(frozen=True)
class DecoderChoice:
    """The native decoder for a model (None when it does not qualify) and why."""
    decoder: object | None
    reason: str


def native_decoder_for(model: nn.Module, attn_backend) -> DecoderChoice:
    """Build the native decoder for `model`, or say why it cannot run on one."""
    problem = _unsupported(model, attn_backend)
    if problem:
        return DecoderChoice(None, problem)
    from kvport_cpu.native import llama_decoder_class
    built = llama_decoder_class()
    if built.op is None:
        return DecoderChoice(None, f"native decoder unavailable: {built.reason}")
    return DecoderChoice(_build(built.op, model, attn_backend.spec), "native")


def _unsupported(model: nn.Module, attn_backend) -> str:
    """Why the native decoder cannot run `model` ('' when it can)."""
    if not isinstance(model, LlamaForCausalLM):
        return f"{type(model).__name__} is not a Llama-family model"
    if model.tp.world_size > 1:
        return "tensor parallelism (the native decoder runs one rank's whole model)"
    if model.model.norm.weight.dtype != torch.float32:
        return f"model dtype {model.model.norm.weight.dtype} (the native decoder is float32)"
    if getattr(attn_backend, "decode_path", None) != "native":
        return ("the attention backend has no native decode path "
                f"({getattr(attn_backend, 'decode_path', type(attn_backend).__name__)})")
    for layer in model.model.layers:
        if type(layer) is not LlamaDecoderLayer or type(layer.mlp) is not GatedMLP:
            return f"layer type {type(layer).__name__} / {type(layer.mlp).__name__}"
        for proj in _projections(layer):
            if not isinstance(proj, (nn.Linear, Int8DynamicLinear)):
                return f"projection type {type(proj).__name__}"
    return ""


def _projections(layer: LlamaDecoderLayer) -> tuple[nn.Module, ...]:
    attn, mlp = layer.self_attn, layer.mlp
    return attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj


_ABSENT = torch.empty(0)


def _linear_tensors(proj: nn.Module) -> list[torch.Tensor]:
    """weight, scale, bias as LlamaDecoder.add_layer takes them (empty: absent)."""
    bias = proj.bias if proj.bias is not None else _ABSENT
    if isinstance(proj, Int8DynamicLinear):
        return [proj.qweight, proj.weight_scale, bias.detach()]
    return [proj.weight.detach(), _ABSENT, bias.detach()]


def _build(decoder_class, model: LlamaForCausalLM, spec):
    inner = model.model
    layer0 = inner.layers[0]
    decoder = decoder_class(
        layer0.input_layernorm.weight.numel(), spec.num_heads, spec.num_kv_heads,
        spec.head_size, float(layer0.input_layernorm.eps), float(spec.scale),
        int(spec.sliding_window or 0), inner.norm.weight.detach(),
        inner.rotary_emb.cos_sin_cache)
    for layer in inner.layers:
        attn = layer.self_attn
        norms = [layer.input_layernorm.weight.detach(),
                 layer.post_attention_layernorm.weight.detach(),
                 attn.q_norm.weight.detach() if attn.q_norm is not None else _ABSENT,
                 attn.k_norm.weight.detach() if attn.k_norm is not None else _ABSENT]
        decoder.add_layer(norms + [t for proj in _projections(layer)
                                   for t in _linear_tensors(proj)])
    return decoder


class NativeDecodeModel(nn.Module):
    """`model` with its all-decode steps run by the native decoder."""

    def __init__(self, model: LlamaForCausalLM, decoder):
        super().__init__()
        self.model = model
        self.decoder = decoder

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], attn_metadata) -> torch.Tensor:
        if not attn_metadata.all_native_decode:
            return self.model(input_ids, positions, kv_caches, attn_metadata)
        native = attn_metadata.native_decode
        x = self.model.model.embed_tokens(input_ids)
        return self.decoder.forward(x, positions, kv_caches, native.block_table,
                                    native.seq_lens, attn_metadata.slot_mapping)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.model.compute_logits(hidden)
