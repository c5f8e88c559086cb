"""Read a checkpoint as (Hugging Face parameter name, tensor) pairs, one tensor at a time.

Two sources: a Hugging Face directory of safetensors, or a GGUF file, whose tensors are
dequantized to float32, renamed to Hugging Face names and, for Llama-architecture files,
un-permuted (llama.cpp's converter reorders the rows of q and k for its own RoPE layout).
The result is what transformers' own GGUF loader produces.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterator

import numpy as np
import torch

from kvport.core.model_info import ModelInfo


class WeightLoadError(ValueError):
    """A checkpoint cannot be loaded into the model; the message names the tensors."""


def iter_weights(model_info: ModelInfo) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, CPU tensor) for every tensor of the model's checkpoint."""
    if model_info.format == "gguf":
        yield from _iter_gguf(model_info.path, model_info.hf_config)
    else:
        yield from _iter_safetensors(model_info.path)


# --------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------

def safetensors_files(directory: str) -> list[str]:
    """The checkpoint's safetensors files: the index's shards, model.safetensors, or all."""
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map") or {}
        files = [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
        absent = [path for path in files if not os.path.isfile(path)]
        if absent:
            raise WeightLoadError(f"{index_path} lists shards that are not there: "
                                  f"{', '.join(os.path.basename(p) for p in absent)}")
        return files
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    files = sorted(os.path.join(directory, name) for name in os.listdir(directory)
                   if name.endswith(".safetensors"))
    if not files:
        others = sorted(n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".pth")))
        hint = (f" (found {', '.join(others)}: convert them to safetensors)" if others else "")
        raise WeightLoadError(f"no *.safetensors weights in {directory}{hint}")
    return files


def _iter_safetensors(directory: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in safetensors_files(directory):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


# --------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------

# GGUF top-level tensor base name -> HF module name
_GGUF_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# GGUF per-block tensor base name -> HF module name under model.layers.N
_GGUF_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Derived data some converters store; the config already describes it.
_GGUF_SKIPPED = {"rope_freqs.weight"}
# Architectures converted by llama.cpp's LlamaModel, which permutes q and k rows.
_GGUF_PERMUTED_ARCHS = {"llama", "mistral"}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def gguf_to_hf_name(name: str) -> str | None:
    """HF name for a GGUF tensor name, or None when kvport does not know it."""
    match = _BLOCK_NAME.fullmatch(name)
    if match:
        layer, base, kind = match.groups()
        module = _GGUF_BLOCK.get(base)
        return None if module is None else f"model.layers.{layer}.{module}.{kind}"
    base, _, kind = name.rpartition(".")
    module = _GGUF_GLOBAL.get(base)
    return None if module is None or kind not in ("weight", "bias") else f"{module}.{kind}"


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute(w, n_head, n_head_kv)` of a q or k weight (or bias).

    llama.cpp groups each head's rows as (pairs, 2) -> (2, pairs) interleaved; this puts them
    back in Hugging Face's rotate_half order (same as transformers' LlamaTensorProcessor).
    """
    pairs = weight.shape[0] // num_heads // 2
    w = weight.reshape(num_heads, pairs, 2, *weight.shape[1:])
    return w.swapaxes(2, 1).reshape(weight.shape)


def _gguf_array(path: str, info) -> np.ndarray:
    """Dequantized float32 data of one tensor, read through a memory map at its offset."""
    import gguf

    qtype = gguf.GGMLQuantizationType(info.ggml_type)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    count = int(np.prod(info.shape))
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=info.offset,
                    shape=(count // block * type_size,))
    if qtype == gguf.GGMLQuantizationType.F32:
        return raw.view(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return raw.view(np.float16).astype(np.float32)
    row_bytes = info.shape[0] // block * type_size
    return gguf.quants.dequantize(raw.reshape(-1, row_bytes), qtype)


def _iter_gguf(path: str, hf_config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    from kvport.core.gguf_file import read_gguf_header

    _, infos = read_gguf_header(path)
    arch = str(hf_config.get("model_type", ""))
    permute = arch in _GGUF_PERMUTED_ARCHS
    num_heads = int(hf_config["num_attention_heads"])
    num_kv_heads = int(hf_config.get("num_key_value_heads") or num_heads)
    for info in infos:
        if info.name in _GGUF_SKIPPED:
            continue
        hf_name = gguf_to_hf_name(info.name)
        if hf_name is None:
            raise WeightLoadError(f"GGUF tensor {info.name!r} in {path} has no known "
                                  f"Hugging Face name (architecture {arch!r})")
        # GGUF lists dims fastest-first, HF slowest-first
        shape = tuple(int(d) for d in reversed(info.shape))
        weights = _gguf_array(path, info).reshape(shape)
        if permute and ".self_attn.q_proj." in hf_name:
            weights = unpermute_rope_rows(weights, num_heads)
        elif permute and ".self_attn.k_proj." in hf_name:
            weights = unpermute_rope_rows(weights, num_kv_heads)
        yield hf_name, torch.from_numpy(np.array(weights, dtype=np.float32))
