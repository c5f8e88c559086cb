"""Load a model's tokenizer (and its chat template) through transformers, offline."""
from __future__ import annotations

import json
import os

from kvport.core.config import ConfigError
from kvport.core.model_info import ModelInfo


def load_tokenizer(model_info: ModelInfo, tokenizer_path: str | None = None):
    """The tokenizer for `model_info` (or from `tokenizer_path`); never touches the network."""
    from transformers import AutoTokenizer

    if tokenizer_path is not None:
        directory, gguf_file = tokenizer_path, None
    else:
        directory, gguf_file = model_info.tokenizer_source
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)
    except Exception as exc:
        raise ConfigError(f"cannot load a tokenizer from {directory!r}"
                          f"{' (' + gguf_file + ')' if gguf_file else ''}: {exc}") from exc


def eos_token_ids(model_info: ModelInfo, tokenizer) -> tuple[int, ...]:
    """Every token id that ends generation: the tokenizer's EOS plus generation_config's."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    candidates = [model_info.hf_config.get("eos_token_id")]
    gen_config = os.path.join(model_info.path, "generation_config.json")
    if model_info.format == "hf" and os.path.isfile(gen_config):
        with open(gen_config) as f:
            candidates.append(json.load(f).get("eos_token_id"))
    for value in candidates:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    return tuple(sorted(ids))
