"""Read a GGUF file's metadata into a Hugging Face style config dict (numpy only).

Reading the tensors themselves is the model loader's job (kvport/models/weights.py).
"""
from __future__ import annotations

from typing import Any

from kvport.core.config import ConfigError

# GGUF key suffix -> Hugging Face config key
_KEYS = {
    "block_count": "num_hidden_layers",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "rope.freq_base": "rope_theta",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.sliding_window": "sliding_window",
    "vocab_size": "vocab_size",
}


def read_gguf_config(path: str) -> tuple[str, dict[str, Any]]:
    """Return (gguf architecture name, HF-style config) for the GGUF file at `path`."""
    from kvport.core.gguf_file import read_gguf_header

    try:
        metadata, tensors = read_gguf_header(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read GGUF file {path!r}: {exc}") from exc
    arch = str(metadata.get("general.architecture", ""))
    config: dict[str, Any] = {"model_type": arch, "torch_dtype": "float32"}
    for suffix, hf_key in _KEYS.items():
        if f"{arch}.{suffix}" in metadata:
            config[hf_key] = metadata[f"{arch}.{suffix}"]
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in metadata:
        config["vocab_size"] = len(metadata["tokenizer.ggml.tokens"])
    for token_key in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{token_key}" in metadata:
            config[token_key] = int(metadata[f"tokenizer.ggml.{token_key}"])
    tensor_names = {tensor.name for tensor in tensors}
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    _read_rope(path, arch, metadata, tensors, config)
    return arch, config


def _read_rope(path: str, arch: str, metadata: dict, tensors, config: dict) -> None:
    """Rope scaling as the HF-style config states it. Llama 3.x GGUFs carry theirs as the
    `rope_freqs` tensor (a divisor per frequency); linear scaling is metadata; other kinds
    (yarn, longrope) are refused rather than run with the wrong positions."""
    dims = metadata.get(f"{arch}.rope.dimension_count")
    head_dim = config.get("head_dim") or (
        config["hidden_size"] // config["num_attention_heads"]
        if "hidden_size" in config and "num_attention_heads" in config else None)
    if dims is not None and head_dim and int(dims) != int(head_dim):
        config["partial_rotary_factor"] = int(dims) / int(head_dim)   # refused by the model
    kind = str(metadata.get(f"{arch}.rope.scaling.type", "none"))
    factors = next((t for t in tensors if t.name == "rope_freqs.weight"), None)
    if kind not in ("none", "linear"):
        raise ConfigError(f"GGUF file {path!r}: rope scaling type {kind!r} is not supported "
                          "(supported: none, linear, and per-frequency factors)")
    if kind == "linear" and factors is not None:
        raise ConfigError(f"GGUF file {path!r} has both linear rope scaling and rope_freqs")
    if kind == "linear":
        config["rope_scaling"] = {"rope_type": "linear",
                                  "factor": float(metadata[f"{arch}.rope.scaling.factor"])}
    elif factors is not None:
        from kvport.core.checkpoint import gguf_tensor
        values = gguf_tensor(path, factors)
        config["rope_scaling"] = {"rope_type": "freq_factors",
                                  "freq_factors": [float(v) for v in values]}
