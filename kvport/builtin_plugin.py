"""kvport's built-in plugin: the pieces that ship with the core, registered through the same
hooks as any third-party plugin (no side doors).

Registration only names dotted paths: nothing here imports torch or the model modules; they
are imported when a backend or model is actually requested from the registry.
"""
from __future__ import annotations

from kvport.platforms.api_version import RECOMMENDED_RANGE
from kvport.platforms.hookspecs import RegisterAttentionBackend, RegisterModel, hookimpl

# The built-in pieces are checked like any plugin (no side doors); they always match the
# kvport they ship with.
KVPORT_PLUGIN_API = RECOMMENDED_RANGE

_LLAMA = "kvport.models.llama:LlamaForCausalLM"

# Hugging Face architecture name -> implementation. Mistral checkpoints share Llama's layout,
# so the Llama implementation serves both.
BUILTIN_MODELS: dict[str, str] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": "kvport.models.qwen2:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "kvport.models.qwen3:Qwen3ForCausalLM",
}


@hookimpl
def kvport_register_attention_backends(register: RegisterAttentionBackend) -> None:
    """The pure-torch reference backend: runs on any torch device, and is the numerical
    reference the conformance kit checks other backends against."""
    register(name="torch_reference",
             backend_class="kvport.attention_backends.torch_reference:TorchReferenceBackend",
             device_types=())


@hookimpl
def kvport_register_models(register: RegisterModel) -> None:
    """The torch model families kvport ships."""
    for architecture, model_class in BUILTIN_MODELS.items():
        register(architecture=architecture, model_class=model_class, framework="torch")
