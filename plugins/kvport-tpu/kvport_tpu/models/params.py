"""Checkpoint tensors (Hugging Face names) -> the JAX Llama parameter pytree, and back to
shapes for random weights.

Layout (leaves under "layers" are stacked over L layers; matrices are [in, out] so a layer
computes x @ W):

    embed [V, D]   norm [D]   lm_head [D, V] (absent when tied)
    layers: input_norm, post_norm [L, D]; qkv [L, D, q + 2 kv]; qkv_bias [L, q + 2 kv];
            o_proj [L, q, D]; o_proj_bias [L, D]; q_norm, k_norm [L, d];
            gate_up [L, D, 2 I]; down [L, I, D]

Host buffers are allocated in the model dtype (numpy holds bfloat16 through ml_dtypes, a jax
dependency), filled tensor by tensor, then moved to the device leaf by leaf.
"""
from __future__ import annotations

import re
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from kvport.core.checkpoint import CheckpointError
from kvport_tpu.models.llama import LlamaSpec

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def leaf_shapes(spec: LlamaSpec) -> dict[str, tuple[int, ...]]:
    """Shape of every leaf ("layers/qkv" for stacked ones) for this model."""
    D, L, d, I = spec.hidden_size, spec.num_layers, spec.head_size, spec.intermediate_size
    qkv = spec.q_size + 2 * spec.kv_size
    shapes = {"embed": (spec.vocab_size, D), "norm": (D,),
              "layers/input_norm": (L, D), "layers/post_norm": (L, D),
              "layers/qkv": (L, D, qkv), "layers/o_proj": (L, spec.q_size, D),
              "layers/gate_up": (L, D, 2 * I), "layers/down": (L, I, D)}
    if not spec.tie_word_embeddings:
        shapes["lm_head"] = (D, spec.vocab_size)
    if spec.qkv_bias:
        shapes["layers/qkv_bias"] = (L, qkv)
    if spec.o_proj_bias:
        shapes["layers/o_proj_bias"] = (L, D)
    if spec.qk_norm:
        shapes["layers/q_norm"] = (L, d)
        shapes["layers/k_norm"] = (L, d)
    return shapes


def _target(spec: LlamaSpec, name: str) -> tuple[str, int | None, slice, bool] | None:
    """HF name -> (leaf, layer or None, slice of the leaf's last axis, transpose?)."""
    q, kv, I = spec.q_size, spec.kv_size, spec.intermediate_size
    everything = slice(None)
    globals_ = {"model.embed_tokens.weight": ("embed", None, everything, False),
                "model.norm.weight": ("norm", None, everything, False),
                "lm_head.weight": ("lm_head", None, everything, True)}
    if name in globals_:
        return globals_[name]
    match = _LAYER.fullmatch(name)
    if not match:
        return None
    layer, module, kind = int(match.group(1)), match.group(2), match.group(3)
    weight = kind == "weight"
    pieces = {
        "self_attn.q_proj": ("qkv", slice(0, q)),
        "self_attn.k_proj": ("qkv", slice(q, q + kv)),
        "self_attn.v_proj": ("qkv", slice(q + kv, q + 2 * kv)),
        "self_attn.o_proj": ("o_proj", everything),
        "mlp.gate_proj": ("gate_up", slice(0, I)), "mlp.up_proj": ("gate_up", slice(I, 2 * I)),
        "mlp.down_proj": ("down", everything),
        "self_attn.q_norm": ("q_norm", everything), "self_attn.k_norm": ("k_norm", everything),
        "input_layernorm": ("input_norm", everything),
        "post_attention_layernorm": ("post_norm", everything),
    }
    if module not in pieces:
        return None
    leaf, cols = pieces[module]
    projection = leaf in ("qkv", "o_proj", "gate_up", "down")
    if not weight:
        if leaf not in ("qkv", "o_proj"):
            return None
        leaf += "_bias"
    return f"layers/{leaf}", layer, cols, projection and weight


def load_params(spec: LlamaSpec, weights: Iterable[tuple[str, np.ndarray]], dtype,
                device=None) -> dict:
    """The parameter pytree on `device`, filled from (HF name, array) pairs.

    Raises CheckpointError naming unexpected tensors, missing ones and shape mismatches.
    """
    shapes = leaf_shapes(spec)
    np_dtype = np.dtype(jnp.dtype(dtype))
    host = {name: np.empty(shape, np_dtype) for name, shape in shapes.items()}
    filled: set[tuple[str, int | None, int | None]] = set()
    unexpected: list[str] = []
    for name, array in weights:
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and spec.tie_word_embeddings:
            continue
        target = _target(spec, name)
        if target is None or target[0] not in host:
            unexpected.append(name)
            continue
        leaf, layer, cols, transpose = target
        dst = host[leaf] if layer is None else host[leaf][layer]
        dst = dst[..., cols]
        src = array.T if transpose else array
        if tuple(src.shape) != tuple(dst.shape):
            raise CheckpointError(f"checkpoint tensor {name} has shape {tuple(array.shape)}, "
                                  f"which does not fit {leaf} {dst.shape} (transposed: "
                                  f"{transpose})")
        dst[...] = src
        filled.add((leaf, layer, cols.start))
    missing = sorted(set(_expected_pieces(spec, shapes)) - filled, key=str)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {_head(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_head(unexpected)}")
    if problems:
        raise CheckpointError("checkpoint does not match the model; " + "; ".join(problems))
    return _to_device(host, device)


def _expected_pieces(spec: LlamaSpec, shapes: dict) -> list[tuple]:
    """Every (leaf, layer, column start) load_params must fill."""
    q, kv, I = spec.q_size, spec.kv_size, spec.intermediate_size
    starts = {"layers/qkv": (0, q, q + kv), "layers/qkv_bias": (0, q, q + kv),
              "layers/gate_up": (0, I)}
    pieces = []
    for leaf in shapes:
        layers = range(spec.num_layers) if leaf.startswith("layers/") else [None]
        for layer in layers:
            for start in starts.get(leaf, (None,)):
                pieces.append((leaf, layer, start))
    return pieces


def random_params(spec: LlamaSpec, dtype, seed: int = 0, device=None, std: float = 0.02) -> dict:
    """Random weights of the model's shapes built on the device (benchmarks: no checkpoint);
    norms are ones."""
    leaves = {}
    key = jax.random.key(seed)
    for i, (name, shape) in enumerate(sorted(leaf_shapes(spec).items())):
        if name.endswith("norm"):
            leaves[name] = jnp.ones(shape, dtype)
        else:
            leaves[name] = (jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
                            * std).astype(dtype)
    return _nest(leaves if device is None else jax.device_put(leaves, device))


def _to_device(host: dict[str, np.ndarray], device) -> dict:
    return _nest({name: jax.device_put(array, device) for name, array in host.items()})


def _nest(flat: dict) -> dict:
    params: dict = {"layers": {}}
    for name, value in flat.items():
        if name.startswith("layers/"):
            params["layers"][name.split("/", 1)[1]] = value
        else:
            params[name] = value
    return params


def _head(names: list, limit: int = 10) -> str:
    text = ", ".join(str(n) for n in names[:limit])
    return text + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
