"""A tiny random-weight Llama the kit builds for itself, and its numpy reference forward pass.

No framework: weights are written with `safetensors.numpy`, the tokenizer with `tokenizers`,
and the reference is plain float64 numpy, so the same checks serve a torch worker and a JAX
one. The checkpoint is an ordinary Hugging Face directory (config.json, model.safetensors,
tokenizer.json), served by the built-in LlamaForCausalLM of whatever framework the platform
uses.

Weights are drawn larger than a trained model's so the logits are peaked: greedy decoding then
has clear winners, and a wrong kernel changes tokens instead of hiding in rounding.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=256,
    intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=64, vocab_size=256, max_position_embeddings=1024, rms_norm_eps=1e-6,
    rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    hidden_act="silu", torch_dtype="float32",
)


@dataclass
class TinyModel:
    """A built checkpoint: where it is, its config and its weights (HF names, float32)."""
    path: str
    config: dict
    weights: dict[str, np.ndarray] = field(repr=False)

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """[len(token_ids), vocab] float64 logits; row p predicts the token after position p."""
        return reference_logits(self.config, self.weights, token_ids)


def random_weights(config: dict, seed: int) -> dict[str, np.ndarray]:
    """Hugging Face-named float32 weights; norms near (not at) 1 so they matter."""
    rng = np.random.default_rng(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads, d = (config["num_attention_heads"], config["num_key_value_heads"],
                          config["head_dim"])
    std = 1.2 / np.sqrt(hidden)   # unit-ish activations through every projection

    def normal(*shape, scale=std):
        return rng.normal(0.0, scale, size=shape).astype(np.float32)

    def norm_weight():
        return (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)

    weights = {"model.embed_tokens.weight": normal(config["vocab_size"], hidden, scale=1.0),
               "model.norm.weight": norm_weight(),
               "lm_head.weight": normal(config["vocab_size"], hidden, scale=3.0 / np.sqrt(hidden))}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights.update({
            p + "input_layernorm.weight": norm_weight(),
            p + "post_attention_layernorm.weight": norm_weight(),
            p + "self_attn.q_proj.weight": normal(heads * d, hidden),
            p + "self_attn.k_proj.weight": normal(kv_heads * d, hidden),
            p + "self_attn.v_proj.weight": normal(kv_heads * d, hidden),
            p + "self_attn.o_proj.weight": normal(hidden, heads * d, scale=1.2 / np.sqrt(heads * d)),
            p + "mlp.gate_proj.weight": normal(inter, hidden),
            p + "mlp.up_proj.weight": normal(inter, hidden),
            p + "mlp.down_proj.weight": normal(hidden, inter, scale=1.2 / np.sqrt(inter)),
        })
    return weights


def write_tokenizer(directory: str, vocab_size: int) -> None:
    """A word-level tokenizer over "<unk> <s> </s> w3 ... wN": enough for detokenization."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                   "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 1024}, f)


def build_tiny_llama(directory: str, seed: int = 0) -> TinyModel:
    """Write the checkpoint into `directory` (created) and return it."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    config = dict(CONFIG)
    weights = random_weights(config, seed)
    save_file(weights, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    write_tokenizer(directory, config["vocab_size"])
    return TinyModel(directory, config, weights)


# ------------------------------------------------------------------ the numpy reference

def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def _rotary(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Hugging Face's rotate_half RoPE. x [T, heads, D]."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    freqs = positions[:, None] * inv_freq[None, :]              # [T, D/2]
    cos, sin = np.cos(freqs)[:, None, :], np.sin(freqs)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Causal GQA attention. q [T, H, D], k/v [T, KV, D] -> [T, H * D]."""
    T, H, D = q.shape
    group = H // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)   # [T, H, D]
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(D)
    scores = np.where(np.tril(np.ones((T, T), dtype=bool))[None], scores, -np.inf)
    scores -= scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", probs, v).reshape(T, H * D)


def reference_logits(config: dict, weights: dict[str, np.ndarray],
                     token_ids: list[int]) -> np.ndarray:
    """The whole sequence at once, in float64: [T, vocab] logits."""
    w = {name: value.astype(np.float64) for name, value in weights.items()}
    eps, theta = config["rms_norm_eps"], config["rope_theta"]
    H, KV, D = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    tokens = np.asarray(token_ids, dtype=np.int64)
    positions = np.arange(len(tokens), dtype=np.float64)
    x = w["model.embed_tokens.weight"][tokens]                     # [T, hidden]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(-1, H, D)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(-1, KV, D)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(-1, KV, D)
        q, k = _rotary(q, positions, theta), _rotary(k, positions, theta)
        x = x + _attention(q, k, v) @ w[p + "self_attn.o_proj.weight"].T
        h = _rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    x = _rms_norm(x, w["model.norm.weight"], eps)
    return x @ w["lm_head.weight"].T
