"""Read a GGUF file's metadata into a Hugging Face style config dict (numpy only).

Reading the tensors themselves is the model loader's job (kvport/models/gguf_loader.py).
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


def _field_value(field) -> Any:
    value = field.contents()
    return value


def read_gguf_config(path: str) -> tuple[str, dict[str, Any]]:
    """Return (gguf architecture name, HF-style config) for the GGUF file at `path`."""
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - gguf is a core dependency
        raise ConfigError("reading .gguf files needs the `gguf` package") from exc
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:
        raise ConfigError(f"cannot read GGUF file {path!r}: {exc}") from exc
    fields = reader.fields
    arch = str(_field_value(fields["general.architecture"]))
    config: dict[str, Any] = {"model_type": arch, "torch_dtype": "float32"}
    for suffix, hf_key in _KEYS.items():
        field = fields.get(f"{arch}.{suffix}")
        if field is not None:
            config[hf_key] = _field_value(field)
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in fields:
        config["vocab_size"] = len(fields["tokenizer.ggml.tokens"].data)
    for token_key in ("bos_token_id", "eos_token_id"):
        field = fields.get(f"tokenizer.ggml.{token_key}")
        if field is not None:
            config[token_key] = int(_field_value(field))
    tensor_names = {tensor.name for tensor in reader.tensors}
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    return arch, config
