"""kvport-cuda's shape-invariant matmul (kvport_cuda/invariant_matmul.py), in Triton's
interpreter on the CPU (compiled on the GPU where there is one).

The kernel's point is that an output element's bits depend only on its row of x, its row of
the weight and k_groups: so a column shard, a row computed alone and a row-parallel split of
K summed in float32 must equal the whole computation bit for bit (torch.equal), not merely
closely. Closeness to a float64 reference is checked separately, with a bound on float32
accumulation plus one rounding to the output dtype. Inputs are fresh random numbers on every
run; the seed is in each failure's message.
"""
from __future__ import annotations

import time

import pytest

from triton_device import triton_device

DEVICE = triton_device("kvport_cuda")

import torch  # noqa: E402

from kvport_cuda.invariant_matmul import BLOCK_N, invariant_linear  # noqa: E402

F32 = torch.float32
# unit roundoff: half a unit in the last place, relative
UNIT = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}


def _inputs(m: int, n: int, k: int, dtype: torch.dtype):
    """Fresh random x [m, k] and weight [n, k], and the seed that made them."""
    seed = time.time_ns() % 2 ** 32
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    w = torch.randn(n, k, generator=gen).to(dtype).to(DEVICE)
    return x, w, seed


def _within_bound(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per element: |got - exact| within float32 summation's error bound (k * u32 times the
    sum of |products|, doubled) plus one rounding to got's dtype (and a subnormal's step)."""
    xd, wd = x.double().cpu(), w.double().cpu()
    exact = xd @ wd.T
    k = x.shape[-1]
    bound = (2 * k * UNIT[F32] * (xd.abs() @ wd.abs().T) + UNIT[got.dtype] * exact.abs()
             + 2.0 ** -24)
    return (got.double().cpu() - exact).abs() <= bound


@pytest.mark.parametrize("k_groups", [1, 2, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_close_to_float64(dtype, k_groups):
    """Ragged M (1, 5, 70: a part-filled tile, and a second one), ragged N (not a multiple of
    BLOCK_N) and K = 320, whose groups end inside a BLOCK_K slice for k_groups 2 and 8."""
    n, k = 3 * BLOCK_N + 9, 320
    for m in (1, 5, 70):
        x, w, seed = _inputs(m, n, k, dtype)
        got = invariant_linear(x, w, k_groups=k_groups)
        assert got.shape == (m, n) and got.dtype == dtype, f"seed {seed}"
        assert not got.isnan().any(), f"seed {seed}"
        ok = _within_bound(got, x, w)
        assert ok.all(), f"seed {seed}: {(~ok).sum().item()} of {ok.numel()} outside the bound"
        # a second check that can fail: the result is not (near) zero
        assert got.float().abs().mean() > 1, f"seed {seed}"


def test_leading_dims_row_views_and_output_dtype():
    """x with leading dims, a row stride wider than K, a single 1-D row; out_dtype float32
    from bf16 operands is the float32 total that bf16 output rounds once."""
    k, n = 192, 2 * BLOCK_N
    wide, w, seed = _inputs(70, n, k + 40, torch.bfloat16)
    w = w[:, :k].contiguous()
    x = wide[:, :k]                                          # row stride k + 40
    expected = invariant_linear(x.contiguous(), w)
    got = invariant_linear(x.view(2, 35, k), w)
    assert got.shape == (2, 35, n) and torch.equal(got.view(70, n), expected), f"seed {seed}"
    assert torch.equal(invariant_linear(x[3], w), expected[3]), f"seed {seed}"
    total = invariant_linear(x, w, out_dtype=F32)
    assert total.dtype == F32 and _within_bound(total, x, w).all(), f"seed {seed}"
    assert torch.equal(total.to(torch.bfloat16), expected), f"seed {seed}"
    assert torch.equal(invariant_linear(x, w, out_dtype=torch.float16), total.half()), \
        f"seed {seed}"


def test_empty_rows_return_empty_output():
    w = torch.ones(BLOCK_N, 128, dtype=torch.bfloat16, device=DEVICE)
    for shape in ((0, 128), (2, 0, 128)):
        x = torch.ones(shape, dtype=torch.bfloat16, device=DEVICE)
        got = invariant_linear(x, w, k_groups=2)
        assert got.shape == (*shape[:-1], BLOCK_N) and got.dtype == torch.bfloat16


@pytest.mark.parametrize("k_groups", [1, 2])
def test_column_shards_are_bit_identical(k_groups):
    """N-invariance: a shard of weight rows (output columns) at multiples of BLOCK_N, as a
    column-parallel rank holds it, computes the same bits as the whole matrix."""
    x, w, seed = _inputs(70, 4 * BLOCK_N, 320, torch.bfloat16)
    for out_dtype in (torch.bfloat16, F32):       # float32 shows every bit of the sums
        full = invariant_linear(x, w, k_groups=k_groups, out_dtype=out_dtype)
        for a, b in ((0, BLOCK_N), (BLOCK_N, 3 * BLOCK_N), (2 * BLOCK_N, 4 * BLOCK_N),
                     (3 * BLOCK_N, 4 * BLOCK_N)):
            shard = invariant_linear(x, w[a:b], k_groups=k_groups, out_dtype=out_dtype)
            assert torch.equal(shard, full[:, a:b]), f"seed {seed}: columns {a}:{b}"


def test_rows_are_bit_identical_in_any_batch():
    """M-invariance: a row alone (a decode step), in a slice, in a gathered subset or in a
    strided view computes the same bits as in the whole batch."""
    x, w, seed = _inputs(70, 2 * BLOCK_N, 320, torch.bfloat16)
    full = invariant_linear(x, w, k_groups=2, out_dtype=F32)   # float32: every bit shows
    index = torch.tensor([67, 3, 10, 3], device=DEVICE)
    for rows in (*(slice(r, r + 1) for r in (0, 1, 37, 63, 64, 69)), slice(5, 40),
                 slice(64, 70), slice(None, None, 3), index):
        assert torch.equal(invariant_linear(x[rows], w, k_groups=2, out_dtype=F32),
                           full[rows]), f"seed {seed}: rows {rows}"
    assert torch.equal(invariant_linear(x[5:40], w, k_groups=2),
                       full[5:40].to(torch.bfloat16)), f"seed {seed}"


def _rank_partials(x, w, ranks: int, k_groups: int):
    """Each rank's float32 partial over its contiguous K / ranks of x and of the weight's
    columns (views, as a row-parallel rank's shard of x would be)."""
    width = x.shape[1] // ranks
    return [invariant_linear(x[:, r * width:(r + 1) * width], w[:, r * width:(r + 1) * width],
                             k_groups=k_groups, out_dtype=F32) for r in range(ranks)]


@pytest.mark.parametrize("k", [512, 640])
def test_row_parallel_split_of_k_is_bit_identical(k):
    """K-split identity: 2 ranks with G groups each, summed r0 + r1 in float32, give one
    device's 2G groups; 4 ranks summed (r0 + r1) + (r2 + r3) give its 4G groups. With
    k = 640 most groups (80 or 160 long) end inside a BLOCK_K slice."""
    x, w, seed = _inputs(70, 2 * BLOCK_N, k, torch.bfloat16)
    for groups in (1, 2, 4):
        r0, r1 = _rank_partials(x, w, 2, groups)
        whole = invariant_linear(x, w, k_groups=2 * groups, out_dtype=F32)
        assert torch.equal(r0 + r1, whole), f"seed {seed}: 2 ranks x {groups} groups"
        assert torch.equal((r0 + r1).to(torch.bfloat16),
                           invariant_linear(x, w, k_groups=2 * groups)), f"seed {seed}"
    for groups in (1, 2):
        r0, r1, r2, r3 = _rank_partials(x, w, 4, groups)
        whole = invariant_linear(x, w, k_groups=4 * groups, out_dtype=F32)
        assert torch.equal((r0 + r1) + (r2 + r3), whole), f"seed {seed}: 4 ranks x {groups}"


def test_the_bitwise_checks_can_fail():
    """The same products added in another order do differ somewhere in float32 on random
    inputs: the equalities above are not trivially true."""
    x, w, seed = _inputs(70, 2 * BLOCK_N, 512, torch.bfloat16)
    sequential = invariant_linear(x, w, k_groups=1, out_dtype=F32)
    halves = _rank_partials(x, w, 2, 1)
    assert not torch.equal(halves[0] + halves[1], sequential), f"seed {seed}"
    r0, r1, r2, r3 = _rank_partials(x, w, 4, 1)
    assert not torch.equal(((r0 + r1) + r2) + r3, invariant_linear(x, w, k_groups=4,
                                                                  out_dtype=F32)), f"seed {seed}"


def test_bad_arguments_raise_value_error():
    bf16 = torch.bfloat16
    x = torch.ones(4, 96, dtype=bf16, device=DEVICE)
    w = torch.ones(BLOCK_N, 96, dtype=bf16, device=DEVICE)
    with pytest.raises(ValueError, match="K mismatch"):
        invariant_linear(x, torch.ones(BLOCK_N, 64, dtype=bf16, device=DEVICE))
    with pytest.raises(ValueError, match="k_groups must be one of"):
        invariant_linear(x, w, k_groups=3)
    with pytest.raises(ValueError, match="k_groups must be one of"):
        invariant_linear(x, w, k_groups=16)
    with pytest.raises(ValueError, match="not divisible by k_groups=8"):   # 36 % 8 == 4
        invariant_linear(torch.ones(4, 36, dtype=bf16, device=DEVICE),
                         torch.ones(BLOCK_N, 36, dtype=bf16, device=DEVICE), k_groups=8)
    with pytest.raises(ValueError, match="dtype mismatch"):
        invariant_linear(x, w.half())
    with pytest.raises(ValueError, match="unsupported dtype"):
        invariant_linear(x.double(), w.double())
    with pytest.raises(ValueError, match="unsupported out_dtype"):
        invariant_linear(x, w, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="weight must be"):
        invariant_linear(x, w[0])
    with pytest.raises(ValueError, match="last dimension must be contiguous"):
        invariant_linear(x, torch.ones(96, BLOCK_N, dtype=bf16, device=DEVICE).T)
    with pytest.raises(ValueError, match="device mismatch"):
        invariant_linear(x, torch.empty(BLOCK_N, 96, dtype=bf16, device="meta"))
