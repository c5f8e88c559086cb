"""Read a checkpoint as (Hugging Face name, numpy array) pairs, without any framework.

For workers that are not torch (the JAX worker): the same two sources as
kvport/models/weights.py, with the same renaming, so every worker loads identical numbers.

* safetensors: read from the file's own header and a memory map. `safetensors.numpy` cannot
  hold bfloat16 (numpy has no such dtype), and most checkpoints are bfloat16, so bf16 tensors
  are widened to float32 here, which is exact (a bf16 is the top half of a float32).
* GGUF: dequantized to float32 with the `gguf` package, renamed to Hugging Face names and,
  for llama-converted files, un-permuted (llama.cpp reorders the rows of q and k for its own
  RoPE layout). The result is what transformers' GGUF loader produces.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Iterator

import numpy as np

from kvport.core.model_info import ModelInfo


class CheckpointError(ValueError):
    """A checkpoint cannot be read; the message names the file or tensor."""


def iter_numpy_weights(model_info: ModelInfo) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, host array) for every tensor of the model's checkpoint, one at a time.

    Floating-point arrays are float32 or float16 (bf16 widened to float32); callers cast.
    """
    if model_info.format == "gguf":
        yield from iter_gguf(model_info.path, model_info.hf_config)
    else:
        for path in safetensors_files(model_info.path):
            yield from iter_safetensors_file(path)


# --------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_, "BF16": np.uint16}


def safetensors_files(directory: str) -> list[str]:
    """The checkpoint's safetensors files: the index's shards, model.safetensors, or all."""
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map") or {}
        files = [os.path.join(directory, n) for n in sorted(set(weight_map.values()))]
        absent = [os.path.basename(p) for p in files if not os.path.isfile(p)]
        if absent:
            raise CheckpointError(f"{index_path} lists shards that are not there: "
                                  f"{', '.join(absent)}")
        return files
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    files = sorted(os.path.join(directory, n) for n in os.listdir(directory)
                   if n.endswith(".safetensors"))
    if not files:
        others = sorted(n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".pth")))
        hint = f" (found {', '.join(others)}: convert them to safetensors)" if others else ""
        raise CheckpointError(f"no *.safetensors weights in {directory}{hint}")
    return files


def iter_safetensors_file(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for each tensor of one safetensors file (format: 8-byte little-endian
    header length, a JSON header of dtype/shape/data_offsets, then the data)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data_start = 8 + header_len
    header.pop("__metadata__", None)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    for name, entry in header.items():
        dtype = _ST_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has dtype {entry['dtype']}, which "
                                  f"kvport cannot read (supported: {', '.join(_ST_DTYPES)})")
        begin, end = entry["data_offsets"]
        array = raw[data_start + begin:data_start + end].view(dtype).reshape(entry["shape"])
        if entry["dtype"] == "BF16":
            array = bf16_bits_to_float32(array)
        yield name, array


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values given as their uint16 bit patterns -> float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


# --------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------

# GGUF top-level tensor base name -> HF module name
_GGUF_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                "output": "lm_head"}
# GGUF per-block tensor base name -> HF module name under model.layers.N
_GGUF_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# Read into the config's rope scaling (kvport/core/gguf_metadata.py), not a weight.
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
    """Undo llama.cpp's `permute(w, n_head, n_head_kv)` of a q or k weight (or bias): each
    head's rows go from (pairs, 2) interleaved back to Hugging Face's rotate_half order."""
    pairs = weight.shape[0] // num_heads // 2
    w = weight.reshape(num_heads, pairs, 2, *weight.shape[1:])
    return w.swapaxes(2, 1).reshape(weight.shape)


def gguf_tensor(path: str, info) -> np.ndarray:
    """Dequantized float32 data of one tensor (flat), read through a memory map."""
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


def iter_gguf(path: str, hf_config: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array in HF shape and row order) for every tensor of a GGUF file."""
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
            raise CheckpointError(f"GGUF tensor {info.name!r} in {path} has no known "
                                  f"Hugging Face name (architecture {arch!r})")
        # GGUF lists dims fastest-first, HF slowest-first
        shape = tuple(int(d) for d in reversed(info.shape))
        weights = gguf_tensor(path, info).reshape(shape)
        if permute and ".self_attn.q_proj." in hf_name:
            weights = unpermute_rope_rows(weights, num_heads)
        elif permute and ".self_attn.k_proj." in hf_name:
            weights = unpermute_rope_rows(weights, num_kv_heads)
        yield hf_name, np.ascontiguousarray(weights, dtype=np.float32)
