"""The Llama decoder: Llama 2/3.x, SmolLM2, Mistral, and (through tiny subclasses) Qwen2/Qwen3.

    embed -> N x [RMSNorm -> attention (fused qkv, RoPE, paged backend) -> residual
                  RMSNorm -> gated SiLU MLP (fused gate/up) -> residual] -> RMSNorm -> lm_head

Tokens of a step are flattened ([T, ...], no batch dimension); the attention backend finds the
requests, their contexts and their KV cache blocks in the step's metadata.
Parameter names follow Hugging Face's except the fused projections: `load_weights` copies
q/k/v_proj into slices of qkv_proj and gate/up_proj into slices of gate_up_proj.

Tensor parallelism (`tp`, a group of more than one rank): each rank builds the same model with
its slice of every layer (kvport/models/parallel_layers.py): whole KV-head groups of the
attention, a slice of the MLP channels and of the vocabulary; norms and rotary tables are
replicated. Each rank loads only its slice from the checkpoint, and the logits are gathered on
rank 0. With one rank (the default) no collective is ever called.
"""
from __future__ import annotations

from typing import Any, ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from kvport.attention_backends.interface import AttentionBackend
from kvport.core.model_info import uniform_sliding_window
from kvport.core.tensor_parallel import HeadShard
from kvport.models.layers import (GatedMLP, RMSNorm, RotaryEmbedding, RotaryRotation,
                                  parse_rope_config)
from kvport.models.parallel_layers import (ColumnParallelLinear, ParallelLMHead,
                                           RowParallelLinear, VocabParallelEmbedding)
from kvport.models.tp_group import SINGLE_GROUP, TensorParallelGroup
from kvport.models.weights import WeightLoadError

# HF checkpoint entries that are derived buffers, not parameters
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
# HF projection name -> (our fused projection, shard id)
_STACKED = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


class LlamaAttention(nn.Module):
    """Attention over this rank's heads (`heads`; all of them with one rank)."""

    def __init__(self, hidden_size: int, heads: HeadShard, total_heads: int,
                 total_kv_heads: int, head_size: int, qkv_bias: bool, o_proj_bias: bool,
                 qk_norm_eps: float | None, attn_backend: AttentionBackend,
                 tp: TensorParallelGroup = SINGLE_GROUP):
        super().__init__()
        D = head_size
        self.num_heads, self.num_kv_heads, self.head_size = heads.num_heads, heads.num_kv_heads, D
        self.q_size, self.kv_size = heads.num_heads * D, heads.num_kv_heads * D
        kv_rows = (total_kv_heads * D, heads.kv_start * D, self.kv_size)
        self.qkv_proj = ColumnParallelLinear(
            hidden_size, {"q": (total_heads * D, heads.q_start * D, self.q_size),
                          "k": kv_rows, "v": kv_rows}, bias=qkv_bias)
        self.o_proj = RowParallelLinear(total_heads * D, heads.q_start * D, self.q_size,
                                        hidden_size, bias=o_proj_bias, tp=tp)
        if qk_norm_eps is not None:   # Qwen3: RMSNorm over each head, before RoPE
            self.q_norm = RMSNorm(head_size, qk_norm_eps)
            self.k_norm = RMSNorm(head_size, qk_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.rotary = RotaryRotation()
        self.attn_backend = attn_backend

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: Any) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_size)            # [T, H, D]
        k = k.view(T, self.num_kv_heads, self.head_size)         # [T, KV, D]
        v = v.reshape(T, self.num_kv_heads, self.head_size).contiguous()
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(q, k, cos, sin)
        out = self.attn_backend.forward(q, k, v, kv_cache, attn_metadata)   # [T, H * D]
        return self.o_proj(out)                                  # [T, hidden]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, self_attn: LlamaAttention, mlp: GatedMLP, hidden_size: int, eps: float):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: Any) -> tuple[torch.Tensor, torch.Tensor]:
        # x is the previous layer's output, residual the stream before it: adding them is
        # fused into the norm. Returns (this layer's MLP output, residual stream).
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, kv_cache, attn_metadata)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    """The decoder stack without the LM head (HF's `model.` prefix)."""

    def __init__(self, vocab_size: int, hidden_size: int, layers: list[LlamaDecoderLayer],
                 rotary_emb: RotaryEmbedding, eps: float, tp: TensorParallelGroup = SINGLE_GROUP):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(vocab_size, hidden_size, tp)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(hidden_size, eps)
        self.rotary_emb = rotary_emb

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], attn_metadata: Any) -> torch.Tensor:
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"got {len(kv_caches)} KV caches for {len(self.layers)} layers")
        x = self.embed_tokens(input_ids)                         # [T, hidden]
        cos, sin = self.rotary_emb(positions, x.dtype)           # [T, D/2] each
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, cos, sin, kv_cache, attn_metadata)
        x, _ = self.norm(x, residual)
        return x                                                 # [T, hidden]


class LlamaForCausalLM(nn.Module):
    """Generic Llama-style decoder over a paged attention backend.

    Subclass hooks (class attributes) keep the other families to a few lines:
    qkv_bias / o_proj_bias: None reads `attention_bias` from the config, a bool forces it;
    qk_norm: per-head RMSNorm on q and k before RoPE (Qwen3);
    sliding_window_needs_flag: the window applies only when `use_sliding_window` is true, and
    then only to layers >= `max_window_layers` unless `layer_types` says otherwise (Qwen).

    `tp` is this process's tensor-parallel group; `attn_backend`'s spec then counts only this
    rank's heads.
    """
    qkv_bias: ClassVar[bool | None] = None
    o_proj_bias: ClassVar[bool | None] = None
    qk_norm: ClassVar[bool] = False
    sliding_window_needs_flag: ClassVar[bool] = False
    # The torch worker passes `tp=` only to model classes that say they take it.
    supports_tensor_parallel: ClassVar[bool] = True

    def __init__(self, hf_config: dict[str, Any], attn_backend: AttentionBackend,
                 tp: TensorParallelGroup = SINGLE_GROUP):
        super().__init__()
        cfg = hf_config
        self.hf_config = cfg
        hidden = int(cfg["hidden_size"])
        num_layers = int(cfg["num_hidden_layers"])
        num_heads = int(cfg["num_attention_heads"])
        num_kv_heads = int(cfg.get("num_key_value_heads") or num_heads)
        head_size = int(cfg.get("head_dim") or hidden // num_heads)
        eps = float(cfg.get("rms_norm_eps", 1e-6))
        attention_bias = bool(cfg.get("attention_bias", False))
        qkv_bias = attention_bias if self.qkv_bias is None else self.qkv_bias
        o_proj_bias = attention_bias if self.o_proj_bias is None else self.o_proj_bias
        self.vocab_size = int(cfg["vocab_size"])
        self.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", False))
        self.sliding_window = self._sliding_window(cfg, num_layers)
        self.tp = tp
        heads = HeadShard.of(num_heads, num_kv_heads, tp.world_size, tp.rank)
        if heads.num_kv_heads == 0:
            raise ValueError(f"{num_kv_heads} KV heads cannot be split over {tp.world_size} "
                             "tensor-parallel ranks")
        self._check_backend(attn_backend, heads.num_heads, heads.num_kv_heads, head_size)

        rotary = RotaryEmbedding(head_size, int(cfg.get("max_position_embeddings") or 2048),
                                 parse_rope_config(cfg))
        layers = [
            LlamaDecoderLayer(
                LlamaAttention(hidden, heads, num_heads, num_kv_heads, head_size, qkv_bias,
                               o_proj_bias, eps if self.qk_norm else None, attn_backend, tp),
                GatedMLP(hidden, int(cfg["intermediate_size"]), bool(cfg.get("mlp_bias", False)),
                         cfg.get("hidden_act", "silu"), tp),
                hidden, eps)
            for _ in range(num_layers)]
        self.model = LlamaModel(self.vocab_size, hidden, layers, rotary, eps, tp)
        # tied: compute_logits reads the embedding matrix, so there is nothing to keep in sync
        # (both hold the same rows of the same vocabulary shard)
        self.lm_head = (None if self.tie_word_embeddings
                        else ParallelLMHead(hidden, self.vocab_size, tp))

    # -- configuration helpers ----------------------------------------------------------------

    def _sliding_window(self, cfg: dict[str, Any], num_layers: int) -> int | None:
        """The one sliding window all layers share, or None; mixed layers are refused."""
        return uniform_sliding_window(cfg, num_layers, self.sliding_window_needs_flag)

    def _check_backend(self, backend: AttentionBackend, num_heads: int, num_kv_heads: int,
                       head_size: int) -> None:
        spec = getattr(backend, "spec", None)
        if spec is None:
            return
        expected = {"num_heads": num_heads, "num_kv_heads": num_kv_heads,
                    "head_size": head_size, "sliding_window": self.sliding_window}
        wrong = {k: (getattr(spec, k), v) for k, v in expected.items() if getattr(spec, k) != v}
        if wrong:
            raise ValueError(f"{type(self).__name__}: the attention backend's spec does not fit "
                             "the model: " + ", ".join(f"{k}={got} (model needs {want})"
                                                       for k, (got, want) in wrong.items()))

    # -- the runner's interface ---------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], attn_metadata: Any) -> torch.Tensor:
        """input_ids, positions [T] -> final-norm hidden states [T, hidden]."""
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [N, hidden] -> float32 logits [N, vocab]; under tensor parallelism the
        vocabulary shards are gathered on rank 0, and the other ranks get None."""
        if self.lm_head is None:                                  # tied to the embedding
            local = F.linear(hidden, self.model.embed_tokens.weight)
        else:
            local = self.lm_head(hidden)
        logits = self.tp.gather_to_first(local, self.vocab_size)
        return None if logits is None else logits.float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face named tensors into the parameters (fused ones slice by slice).

        Raises WeightLoadError naming every unexpected checkpoint entry and every parameter
        (or fused slice) the checkpoint did not provide, or a shape that does not fit. The
        parallel layers copy only this rank's slice of each tensor.
        """
        params = dict(self.named_parameters())
        loaded: set[tuple[str, Any]] = set()
        unexpected: list[str] = []
        for name, tensor in weights:
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            target, shard = self._param_name(name)
            param = params.get(target)
            if param is None:
                unexpected.append(name)
                continue
            module_name, _, attr = target.rpartition(".")
            module = self.get_submodule(module_name)
            if hasattr(module, "load_shard"):
                module.load_shard(attr, tensor, shard, name)
            elif tuple(tensor.shape) != tuple(param.shape):
                raise WeightLoadError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                                      f"the model expects {tuple(param.shape)}")
            else:
                param.data.copy_(tensor)
            loaded.add((target, shard))
        missing = [self._hf_name(p, s) for p in params for s in self._shards(p)
                   if (p, s) not in loaded]
        problems = []
        if missing:
            problems.append(f"missing {len(missing)}: {_head(missing)}")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)}: {_head(unexpected)}")
        if problems:
            raise WeightLoadError(f"{type(self).__name__}: checkpoint does not match the model; "
                                  + "; ".join(problems))

    # -- weight-name mapping ------------------------------------------------------------------

    @staticmethod
    def _param_name(hf_name: str) -> tuple[str, Any]:
        """HF name -> (our parameter name, shard id or None)."""
        parts = hf_name.split(".")
        if len(parts) >= 2 and parts[-2] in _STACKED:
            fused, shard = _STACKED[parts[-2]]
            parts[-2] = fused
            return ".".join(parts), shard
        return hf_name, None

    @staticmethod
    def _shards(param_name: str) -> tuple[Any, ...]:
        module = param_name.split(".")[-2]
        if module == "qkv_proj":
            return ("q", "k", "v")
        if module == "gate_up_proj":
            return (0, 1)
        return (None,)

    @staticmethod
    def _hf_name(param_name: str, shard: Any) -> str:
        if shard is None:
            return param_name
        inverse = {v: k for k, v in _STACKED.items()}
        parts = param_name.split(".")
        parts[-2] = inverse[(parts[-2], shard)]
        return ".".join(parts)


def _head(names: list[str], limit: int = 10) -> str:
    text = ", ".join(names[:limit])
    return text + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
