"""A Triton matmul whose every output element has the same bits whatever shapes it is part of.

Floating-point addition is not associative: the same dot product summed in another order
can round differently in its last bit. cuBLAS picks its tiles, its split-K and so its order
of additions from the matrix shapes, so a column-parallel shard (N / tp columns), a decode
step (a few rows) and a prefill chunk (thousands of rows) each sum in their own order. One
flipped bit in a logit is enough for greedy decoding on two GPUs to leave what one GPU
writes. This kernel fixes the order of every addition, so that a tensor-parallel model can
compute, bit for bit, what the same model computes on one device.

The arithmetic, for out[m, n] = sum over k of x[m, k] * weight[n, k]:

- K is cut into `k_groups` equal contiguous groups (1, 2, 4 or 8; K % k_groups == 0).
- Each group's dot product is accumulated in float32, one BLOCK_K slice after another, in
  K order. A group whose length is not a multiple of BLOCK_K has its last slice padded
  with zeros, which only adds exact zeros.
- The group partials are added in a fixed pairwise tree: g0 + g1 for two groups,
  (g0 + g1) + (g2 + g3) for four, ((g0 + g1) + (g2 + g3)) + ((g4 + g5) + (g6 + g7)) for
  eight.
- The float32 total is rounded once, to nearest even, to out_dtype (x's dtype by default).

The tile configuration (BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES) is fixed here,
never chosen from M, N or K (no autotuning), and K is never split across programs. So
out[m, n] depends only on x[m, :], weight[n, :] and k_groups, and:

- N-invariance: invariant_linear(x, W)[:, a:b] == invariant_linear(x, W[a:b]) when a and b
  are multiples of BLOCK_N (a column-parallel shard then sits at the same place in its
  tiles as in the whole matrix). BLOCK_N is 64, which divides the shards of real models:
  3072, 7168, 14336, and a 128256-word vocabulary cut in 2 (64128) or in 4 (32064, which
  128 does not divide). Callers check `width % BLOCK_N == 0`.
- M-invariance: a row has the same bits alone, in a decode batch or in a prefill chunk.
- K-split identity: a row-parallel layer on R ranks (R = 2 or 4), each holding K / R of
  the inputs and computing k_groups=G with out_dtype=float32, reproduces one device's
  k_groups=R*G result exactly when the partials are summed in float32 as the same tree:
  r0 + r1 for two ranks, (r0 + r1) + (r2 + r3) for four. Each rank's groups are the
  device's groups, and the tree over R*G groups is the tree over ranks of the trees over G.

bf16, fp16 and float32 operands are accepted (both of one dtype); float32 dots are IEEE
(no TF32), whose rounding would not be fixed by the order alone.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvport_cuda.triton_math import round_to_dtype

# Fixed: choosing any of these from the shapes would change the order of additions.
BLOCK_M = 64
BLOCK_N = 64
BLOCK_K = 64
NUM_WARPS = 4       # one warpgroup: one Hopper wgmma tile of 64 x 64
NUM_STAGES = 3      # 3 x (64 x 64 + 64 x 64) x 4 bytes = 96 KiB of shared memory at float32
GROUP_M = 8         # program order only (L2 reuse); it never changes what a program adds
K_GROUPS = (1, 2, 4, 8)

_OPERAND_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _group_partial(x_rows, w_rows, m_mask, n_mask, k_start, group_len,
                   BLOCK_K: tl.constexpr, ON_CPU: tl.constexpr):
    """One K group's float32 partial [BLOCK_M, BLOCK_N]: its BLOCK_K slices added in K
    order. `x_rows` [BLOCK_M] and `w_rows` [BLOCK_N] point at each row's element k = 0."""
    acc = tl.zeros((x_rows.shape[0], w_rows.shape[0]), dtype=tl.float32)
    kk = tl.arange(0, BLOCK_K)
    for k0 in range(0, group_len, BLOCK_K):
        k_mask = (k0 + kk) < group_len        # the group's last slice: zeros past its end
        k = k_start + k0 + kk
        a = tl.load(x_rows[:, None] + k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        b = tl.load(w_rows[None, :] + k[:, None], mask=k_mask[:, None] & n_mask[None, :],
                    other=0.0)
        if ON_CPU:
            # Triton's CPU interpreter (tests) computes tl.dot with numpy's matmul, whose
            # BLAS sums a row in an order that depends on the row's place in the tile (and
            # it multiplies bf16 tiles as their raw uint16 bits). Here every element of the
            # tile is summed alike: float32 products (exact for 16-bit operands), one sum.
            prod = a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :]
            acc = acc + tl.sum(prod, axis=1)
        else:
            acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _pair(x_rows, w_rows, m_mask, n_mask, first, group_len,
          BLOCK_K: tl.constexpr, ON_CPU: tl.constexpr):
    """g[first] + g[first + 1]."""
    g0 = _group_partial(x_rows, w_rows, m_mask, n_mask, first * group_len, group_len,
                        BLOCK_K, ON_CPU)
    g1 = _group_partial(x_rows, w_rows, m_mask, n_mask, (first + 1) * group_len, group_len,
                        BLOCK_K, ON_CPU)
    return g0 + g1


@triton.jit
def _quad(x_rows, w_rows, m_mask, n_mask, first, group_len,
          BLOCK_K: tl.constexpr, ON_CPU: tl.constexpr):
    """(g[first] + g[first + 1]) + (g[first + 2] + g[first + 3])."""
    s01 = _pair(x_rows, w_rows, m_mask, n_mask, first, group_len, BLOCK_K, ON_CPU)
    s23 = _pair(x_rows, w_rows, m_mask, n_mask, first + 2, group_len, BLOCK_K, ON_CPU)
    return s01 + s23


# group_len is never specialised: a constant trip count of 1 (K == k_groups) would let the
# compiler fold the loop and then fuse `g0 + g1` into g1's dot, adding in another order.
@triton.jit(do_not_specialize=["group_len"])
def _invariant_matmul_kernel(x_ptr, w_ptr, out_ptr, M, N, group_len,
                             stride_xm, stride_wn, stride_om,
                             K_GROUPS: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr, ON_CPU: tl.constexpr):
    # Grouped program order, as in Triton's matmul tutorial: which program computes a tile
    # changes where it runs, never what it adds.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    # int64 offsets: a 128256 x 4096 weight has more elements than int32 can index
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rows < M
    n_mask = cols < N
    x_rows = x_ptr + rows * stride_xm
    w_rows = w_ptr + cols * stride_wn

    # The fixed tree over the groups; at most four float32 tiles live at once (eight groups:
    # the first half's sum, the second half's first pair, a partial and its accumulator).
    if K_GROUPS == 1:
        total = _group_partial(x_rows, w_rows, m_mask, n_mask, 0, group_len, BLOCK_K, ON_CPU)
    elif K_GROUPS == 2:
        total = _pair(x_rows, w_rows, m_mask, n_mask, 0, group_len, BLOCK_K, ON_CPU)
    elif K_GROUPS == 4:
        total = _quad(x_rows, w_rows, m_mask, n_mask, 0, group_len, BLOCK_K, ON_CPU)
    else:
        first_half = _quad(x_rows, w_rows, m_mask, n_mask, 0, group_len, BLOCK_K, ON_CPU)
        second_half = _quad(x_rows, w_rows, m_mask, n_mask, 4, group_len, BLOCK_K, ON_CPU)
        total = first_half + second_half

    # Rounded once; round_to_dtype rounds bf16 on the bits (to nearest even) where a plain
    # cast would truncate in Triton's CPU interpreter.
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    out = out_ptr + rows[:, None] * stride_om + cols[None, :]
    tl.store(out, round_to_dtype(total, dtype).to(dtype),
             mask=m_mask[:, None] & n_mask[None, :])


def _check(x: torch.Tensor, weight: torch.Tensor, k_groups: int,
           out_dtype: torch.dtype) -> None:
    """Raise ValueError naming what is wrong with the arguments."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [N, K], got shape {tuple(weight.shape)}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension ([..., K])")
    K = weight.shape[1]
    if x.shape[-1] != K:
        raise ValueError(f"K mismatch: x is {tuple(x.shape)} (K={x.shape[-1]}) but weight "
                         f"is {tuple(weight.shape)} (K={K})")
    if x.device != weight.device:
        raise ValueError(f"device mismatch: x on {x.device}, weight on {weight.device}")
    if x.dtype != weight.dtype:
        raise ValueError(f"dtype mismatch: x is {x.dtype}, weight is {weight.dtype} (both "
                         f"must be one of bfloat16, float16, float32)")
    if x.dtype not in _OPERAND_DTYPES:
        raise ValueError(f"unsupported dtype {x.dtype}: operands must be bfloat16, float16 "
                         f"or float32")
    if out_dtype not in _OPERAND_DTYPES:
        raise ValueError(f"unsupported out_dtype {out_dtype}: must be bfloat16, float16 or "
                         f"float32")
    if not isinstance(k_groups, int) or isinstance(k_groups, bool) or k_groups not in K_GROUPS:
        raise ValueError(f"k_groups must be one of {K_GROUPS} (a power of two up to 8), "
                         f"got {k_groups!r}")
    if K % k_groups:
        raise ValueError(f"K={K} is not divisible by k_groups={k_groups}")
    if K > 1 and weight.stride(1) != 1:
        raise ValueError(f"weight's last dimension must be contiguous (stride 1), got "
                         f"strides {weight.stride()}")


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, *, k_groups: int = 1,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T -> a new [..., N] tensor of out_dtype (default x.dtype),
    summed in the fixed order of the module docstring.

    x may be a row view (any row stride); its rows are copied first only where its last
    dimension is not contiguous, which moves no bits. weight's last dimension must be
    contiguous (a copy of a weight would cost its whole size on every call); its row stride
    is free, so a column slice of a weight (a row-parallel shard) needs no copy.
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    _check(x, weight, k_groups, out_dtype)
    N, K = weight.shape
    M = math.prod(x.shape[:-1])
    x2 = x.reshape(M, K)
    if K > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((M, N), dtype=out_dtype, device=x.device)
    if M and N:
        grid = (triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N),)
        _invariant_matmul_kernel[grid](
            x2, weight, out, M, N, K // k_groups, x2.stride(0), weight.stride(0),
            out.stride(0), K_GROUPS=k_groups, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K, GROUP_M=GROUP_M, ON_CPU=x.device.type != "cuda",
            num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out.view(*x.shape[:-1], N)
