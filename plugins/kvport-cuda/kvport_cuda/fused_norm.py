"""RMSNorm with its residual add in one Triton kernel, swapped into a model on the GPU.

kvport's RMSNorm (kvport/models/layers.py) is plain torch: upcast, square, mean, rsqrt,
multiply, downcast, scale, plus the residual add before it: about nine kernels, twice per
layer. A 1B model's decode step at batch 256 spends about a third of its GPU time in such
small element-wise kernels (docs/benchmarks.md, W1 profile). Here each norm is one kernel
computing the same thing in the same order of roundings:

    s = x + residual                  (rounded to the model dtype, returned as the residual)
    y = (s.float() * rsqrt(mean(s.float()^2) + eps)).to(dtype)
    out = weight * y                  (in the promoted dtype of weight and y)

`fuse_rms_norms(model)` replaces every RMSNorm module by a FusedRMSNorm sharing its weight,
as quantization replaces Linear layers; the replacement runs the kernel on contiguous CUDA
inputs and RMSNorm's own code otherwise (CPU tensors, strided views such as Qwen3's per-head
q/k norms).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from kvport.models.layers import RMSNorm
from kvport_cuda.module_swap import replace_modules
from kvport_cuda.triton_math import rms_normalise


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, out_ptr, res_out_ptr, w_ptr, n, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * n + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * n + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * n + offs, x, mask=mask)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = rms_normalise(x.to(tl.float32), w, n, eps, x_ptr.dtype.element_ty)
    tl.store(out_ptr + row * n + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None):
    """The fused kernel on contiguous x (and residual) [..., n]: returns norm(x) or, with a
    residual, (norm(x + residual), x + residual), as RMSNorm.forward does."""
    n = x.shape[-1]
    rows = x.numel() // n
    out = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
    res_out = torch.empty_like(x) if residual is not None else x
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(rows,)](x, residual if residual is not None else x, out, res_out, weight,
                              n, eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
                              num_warps=max(1, min(8, block // 256)))
    return out if residual is None else (out, res_out)


class FusedRMSNorm(RMSNorm):
    """RMSNorm whose forward is one kernel on contiguous CUDA tensors."""

    @classmethod
    def from_module(cls, module: RMSNorm) -> "FusedRMSNorm":
        fused = cls(module.weight.shape[0], module.eps)
        fused.weight = module.weight                 # the same Parameter, already loaded
        return fused

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.is_cuda and x.is_contiguous() and (residual is None or residual.is_contiguous()):
            return rms_norm(x, self.weight, self.eps, residual)
        return super().forward(x, residual)


def fuse_rms_norms(model: nn.Module) -> int:
    """Replace every RMSNorm of `model` by a FusedRMSNorm; returns how many."""
    return replace_modules(model, RMSNorm, FusedRMSNorm.from_module)
