"""Building blocks shared by the decoder families: RMSNorm, rotary embedding, gated MLP.

Token layout everywhere: a step's tokens are flattened, so activations are [T, hidden] and
per-head tensors [T, heads, head_size]; there is no batch dimension.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Rope parameters are read by the framework-free core (shared with the JAX worker); the
# frequencies are computed here in torch, exactly as transformers computes them.
from kvport.core.rope import (RopeConfig, check_freq_factors,  # noqa: F401  (re-exported)
                              parse_rope_config)
from kvport.core.tensor_parallel import split_evenly
from kvport.models.parallel_layers import ColumnParallelLinear, RowParallelLinear
from kvport.models.tp_group import SINGLE_GROUP, TensorParallelGroup



class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 like Hugging Face's LlamaRMSNorm.

    `forward(x, residual)` fuses the residual add the decoder layers need:
    it returns (norm(x + residual), x + residual).
    """

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


# --------------------------------------------------------------------------------------------
# Rotary position embedding
# --------------------------------------------------------------------------------------------

def rope_inv_freq(rope: RopeConfig, head_size: int, device=None) -> torch.Tensor:
    """[head_size // 2] float32 inverse frequencies, computed as transformers computes them."""
    exponents = torch.arange(0, head_size, 2, dtype=torch.int64, device=device).float() / head_size
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "freq_factors":
        inv_freq = inv_freq / torch.tensor(check_freq_factors(rope, head_size),
                                           dtype=torch.float32, device=device)
    elif rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_freq_wavelen = old_len / rope.low_freq_factor
        high_freq_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are divided by factor, short ones kept, the band between smoothed
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor
                                                              - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox / HF "rotate_half" rotation. x [T, heads, D]; cos, sin [T, D/2]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)               # [T, 1, D/2]
    x1, x2 = x.chunk(2, dim=-1)                                  # [T, heads, D/2] each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RotaryRotation(nn.Module):
    """Rotates a layer's queries and keys by the step's cos/sin (`apply_rotary` on each).

    A module rather than a function call so that a platform can swap in a kernel doing both
    in one launch, as it swaps RMSNorm (kvport-cuda's FusedRotaryRotation): in plain torch
    the rotation is seven element-wise kernels per tensor, per layer. Implementations may
    rotate `q` and `k` in place; callers pass tensors they own.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, heads, D], k [T, kv_heads, D]; cos, sin [T, D/2] -> rotated (q, k)."""
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


class RotaryEmbedding(nn.Module):
    """cos/sin for every position below max_positions, precomputed in float32 and looked up
    by the step's positions once per step; every layer's RotaryRotation then applies them."""

    def __init__(self, head_size: int, max_positions: int, rope: RopeConfig):
        super().__init__()
        if head_size % 2:
            raise ValueError(f"rotary embedding needs an even head size, got {head_size}")
        self.head_size, self.max_positions, self.rope = head_size, max_positions, rope
        # [max_positions, head_size]: cos in the first half, sin in the second
        self.register_buffer("cos_sin_cache", torch.empty(max_positions, head_size,
                                                          dtype=torch.float32),
                             persistent=False)
        self.reset_cache()

    @torch.no_grad()
    def reset_cache(self) -> None:
        """(Re)compute the cache on its current device, e.g. after `to_empty`."""
        device = self.cos_sin_cache.device
        if device.type == "meta":
            return
        inv_freq = rope_inv_freq(self.rope, self.head_size, device=device)
        positions = torch.arange(self.max_positions, device=device).float()
        freqs = positions[:, None] * inv_freq[None, :]           # [max_positions, D/2]
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
        self.cos_sin_cache = cache.to(self.cos_sin_cache.dtype)

    def forward(self, positions: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, head_size // 2] in `dtype`, for `apply_rotary`."""
        cos, sin = self.cos_sin_cache[positions].to(dtype).chunk(2, dim=-1)
        return cos, sin

    def extra_repr(self) -> str:
        return f"head_size={self.head_size}, max_positions={self.max_positions}, {self.rope}"


# --------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------

class SiluAndMul(nn.Module):
    """silu(gate) * up for x = [gate | up] along the last dimension (a module so that a
    platform can swap in one kernel for the two element-wise ones)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, 2 * inter] -> [T, inter]."""
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul.

    Under tensor parallelism each rank holds a slice of the intermediate channels: gate/up
    column-parallel, down row-parallel (its all-reduce sums the ranks' slices).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False,
                 hidden_act: str = "silu", tp: TensorParallelGroup = SINGLE_GROUP):
        super().__init__()
        if hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {hidden_act!r}; supported: silu")
        start, count = split_evenly(intermediate_size, tp.world_size, tp.rank)
        self.intermediate_size = count                           # this rank's channels
        rows = (intermediate_size, start, count)
        self.gate_up_proj = ColumnParallelLinear(hidden_size, {0: rows, 1: rows}, bias=bias)
        self.down_proj = RowParallelLinear(intermediate_size, start, count, hidden_size,
                                           bias=bias, tp=tp)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))     # [T, hidden]
