"""Triton helpers shared by kvport-cuda's kernels: rounding where torch rounds, and the RMS
normalisation of one row (the fused norm and the fused all-reduce + norm compute it alike)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to_dtype(x, dtype: tl.constexpr):
    """Round float32 `x` to the model dtype (to nearest, ties to even) and back to float32:
    where a torch op would round. bf16 is rounded on the bits: a cast pair to bf16 and back
    can be folded away by the compiler, and Triton's CPU interpreter truncates."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif dtype == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def rms_normalise(xf, w, n, eps, dtype: tl.constexpr):
    """weight * (x / rms(x)) for one row as kvport's RMSNorm computes it: x (float32 values
    of the model dtype) scaled in float32, rounded to the model dtype, then times the float32
    weight. Masked-off lanes must be 0 in `xf`."""
    inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / n + eps)
    return w * round_to_dtype(xf * inv, dtype)
