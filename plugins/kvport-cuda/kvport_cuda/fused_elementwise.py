"""The rotary rotation and silu(gate) * up as one Triton kernel each, swapped into a model.

In plain torch, rotating a layer's queries and keys is fourteen element-wise kernels (seven
per tensor: four products, a difference, a sum, a concatenation) and the gated activation
is two. On a GPU each launch costs a few microseconds even on a decode step's few rows, and
inside a CUDA graph the launches still run one after the other, so a 32-layer model pays
about 500 of them per step. Under tensor parallelism the weights' share of a step halves but
these launches do not, which is much of why two GPUs gave less than twice one's throughput
(docs/benchmarks.md, "What bounds TP=2").

Both kernels round exactly where the torch ops round (each product, then the sum or
difference, in the model dtype; silu before the product), so on a GPU a bf16 model computes
the same numbers as before, launch count aside (Triton's exp may differ from CUDA's expf in
the last float32 bit, which rounding to bf16 almost always absorbs).

`fuse_elementwise(model)` replaces each RotaryRotation and SiluAndMul by the fused module;
those run their kernel on CUDA tensors of the layout they expect and the torch code otherwise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from torch import nn

from kvport.models.layers import RotaryRotation, SiluAndMul
from kvport_cuda.triton_math import round_to_dtype
from kvport_cuda.module_swap import replace_modules


@triton.jit
def _rotate_heads(base, stride_h, num_heads, c, s, d, d_mask,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate the [num_heads, 2 * HALF] rows at `base` in place (rotate_half layout)."""
    dtype: tl.constexpr = base.dtype.element_ty
    for h0 in range(0, num_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < num_heads)[:, None] & d_mask[None, :]
        first = base + h[:, None] * stride_h + d[None, :]
        x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
        o1 = round_to_dtype(x1 * c, dtype) - round_to_dtype(x2 * s, dtype)
        o2 = round_to_dtype(x2 * c, dtype) + round_to_dtype(x1 * s, dtype)
        tl.store(first, round_to_dtype(o1, dtype).to(dtype), mask=mask)
        tl.store(first + HALF, round_to_dtype(o2, dtype).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_ct, stride_st, num_q_heads, num_k_heads,
                   HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HALF
    c = tl.load(cos_ptr + t * stride_ct + d, mask=d_mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_st + d, mask=d_mask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, num_q_heads, c, s, d, d_mask,
                  HALF=HALF, BLOCK_H=BLOCK_H)
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, num_k_heads, c, s, d, d_mask,
                  HALF=HALF, BLOCK_H=BLOCK_H)


def _rows_of_heads(x: torch.Tensor) -> bool:
    """[T, heads, D] whose heads lie D apart with unit stride inside (a view of a fused qkv
    row qualifies: only the token stride is free)."""
    return x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]


def rotate_in_place(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> None:
    """Rotate q [T, H, D] and k [T, KV, D] in place by cos, sin [T, D/2], in one launch."""
    T, num_q_heads, D = q.shape
    half = D // 2
    if T == 0:
        return
    block_h = max(1, min(triton.next_power_of_2(max(num_q_heads, k.shape[1])), 4096 // D))
    _rotary_kernel[(T,)](q, k, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                         cos.stride(0), sin.stride(0), num_q_heads, k.shape[1],
                         HALF=half, BLOCK_D=triton.next_power_of_2(half), BLOCK_H=block_h,
                         num_warps=4)


class FusedRotaryRotation(RotaryRotation):
    """RotaryRotation in one kernel, in place, on CUDA tensors of one dtype."""

    def forward(self, q, k, cos, sin):
        fits = (q.is_cuda and _rows_of_heads(q) and _rows_of_heads(k)
                and q.shape[2] == k.shape[2] and cos.stride(-1) == 1 and sin.stride(-1) == 1
                and q.dtype == k.dtype == cos.dtype == sin.dtype)
        if not fits:
            return super().forward(q, k, cos, sin)
        rotate_in_place(q, k, cos, sin)
        return q, k


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inter, stride_xt, stride_ot, BLOCK: tl.constexpr,
                         LIBDEVICE_EXP: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + t * stride_xt + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * stride_xt + inter + cols, mask=mask, other=0.0).to(tl.float32)
    # F.silu's formula with CUDA's expf (tl.exp is a faster approximation; the CPU
    # interpreter has no libdevice) and an IEEE division, rounded as its result is
    if LIBDEVICE_EXP:
        e = libdevice.exp(-gate)
    else:
        e = tl.exp(-gate)
    act = round_to_dtype(tl.math.div_rn(gate, 1.0 + e), dtype)
    tl.store(out_ptr + t * stride_ot + cols, round_to_dtype(act * up, dtype).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2 * inter] (unit stride along the row) -> silu(gate) * up [T, inter]."""
    T, width = x.shape
    inter = width // 2
    out = torch.empty((T, inter), dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(T, triton.cdiv(inter, block))](x, out, inter, x.stride(0),
                                                         out.stride(0), BLOCK=block,
                                                         LIBDEVICE_EXP=x.is_cuda, num_warps=4)
    return out


class FusedSiluAndMul(SiluAndMul):
    """SiluAndMul in one kernel on 2-D CUDA tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dim() == 2 and x.stride(1) == 1 and x.shape[1] % 2 == 0:
            return silu_and_mul(x)
        return super().forward(x)


def fuse_elementwise(model: nn.Module) -> dict[str, int]:
    """Swap in the fused rotary rotation and activation; returns how many of each."""
    return {"rotary": replace_modules(model, RotaryRotation, lambda m: FusedRotaryRotation()),
            "silu_and_mul": replace_modules(model, SiluAndMul, lambda m: FusedSiluAndMul())}
