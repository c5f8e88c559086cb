"""kvport-cuda's fused rotary rotation and silu x up against the torch code they replace, in
Triton's interpreter on the CPU (on the GPU where there is one).

In bf16 both kernels must equal the torch ops bit for bit (they round where torch rounds, on
the bits, so Triton's CPU interpreter agrees too), except that on a GPU libdevice's expf may
rarely move silu by a bf16 unit where torch's build differs. float32 allows the few units in
the last place that a fused multiply-add or another exp may move.
"""
from __future__ import annotations

import pytest

from triton_device import triton_device

DEVICE = triton_device("kvport_cuda")

import torch  # noqa: E402

from kvport.models.layers import GatedMLP, RotaryRotation, SiluAndMul  # noqa: E402
from kvport_cuda.fused_elementwise import (FusedRotaryRotation, FusedSiluAndMul,  # noqa: E402
                                           fuse_elementwise, rotate_in_place, silu_and_mul)


def _close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    """Equal in bf16; within 8 float32 units in the last place in float32."""
    if dtype != torch.float32:
        return torch.equal(got, expected)
    scale = expected.float().abs().clamp_min(1.0)
    return bool(((got.float() - expected.float()).abs() <= 8 * 2.0 ** -23 * scale).all())


def _qkv(tokens: int, heads: int, kv_heads: int, head_size: int, dtype, seed: int):
    """A fused qkv row per token and views q, k into it, as LlamaAttention makes them."""
    gen = torch.Generator().manual_seed(seed)
    width = (heads + 2 * kv_heads) * head_size
    qkv = (3 * torch.randn(tokens, width, generator=gen)).to(dtype).to(DEVICE)
    q = qkv[:, :heads * head_size].view(tokens, heads, head_size)
    k = qkv[:, heads * head_size:(heads + kv_heads) * head_size].view(tokens, kv_heads,
                                                                      head_size)
    angles = torch.rand(tokens, head_size // 2, generator=gen) * 6.3
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype).to(DEVICE)
    cos, sin = cos_sin.chunk(2, dim=-1)                        # strided views, as the model's
    return qkv, q, k, cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, head_size", [(4, 2, 64), (6, 1, 32), (40, 8, 128)])
def test_rotation_in_place_matches_apply_rotary(dtype, heads, kv_heads, head_size):
    qkv, q, k, cos, sin = _qkv(5, heads, kv_heads, head_size, dtype, seed=heads)
    v_before = qkv[:, (heads + kv_heads) * head_size:].clone()
    expected_q, expected_k = RotaryRotation()(q, k, cos, sin)
    untouched = q.clone()
    rotate_in_place(q, k, cos, sin)
    assert _close(q, expected_q, dtype) and _close(k, expected_k, dtype)
    assert not _close(untouched, expected_q, dtype)            # the check can fail
    assert torch.equal(qkv[:, (heads + kv_heads) * head_size:], v_before)   # v left alone


def test_fused_rotation_falls_back_where_the_kernel_does_not_apply():
    """CPU tensors (and other layouts) take the torch code: same result, inputs untouched."""
    _, q, k, cos, sin = _qkv(3, 4, 2, 16, torch.float32, seed=7)
    q_cpu, k_cpu, cos_cpu, sin_cpu = (t.cpu() for t in (q, k, cos, sin))
    before = q_cpu.clone()
    got_q, got_k = FusedRotaryRotation()(q_cpu, k_cpu, cos_cpu, sin_cpu)
    expected_q, expected_k = RotaryRotation()(q_cpu, k_cpu, cos_cpu, sin_cpu)
    assert torch.equal(got_q, expected_q) and torch.equal(got_k, expected_k)
    assert torch.equal(q_cpu, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens, inter", [(1, 64), (7, 1500), (3, 2304)])
def test_silu_and_mul_matches_torch(dtype, tokens, inter):
    gen = torch.Generator().manual_seed(inter)
    x = (4 * torch.randn(tokens, 2 * inter, generator=gen)).to(dtype).to(DEVICE)
    expected = SiluAndMul()(x)
    got = silu_and_mul(x)
    assert got.shape == (tokens, inter) and got.dtype == dtype
    if DEVICE.type == "cuda" and dtype != torch.float32 and not torch.equal(got, expected):
        differs = (got != expected)                # rarely a bf16 unit (see the docstring)
        assert differs.float().mean().item() < 1e-3
        assert _close_loose(got[differs], expected[differs])
    else:
        assert _close(got, expected, dtype)
    assert not _close(got, x[:, :inter], dtype)                # the check can fail


def _close_loose(got: torch.Tensor, expected: torch.Tensor) -> bool:
    scale = expected.float().abs().clamp_min(1.0)
    return bool(((got.float() - expected.float()).abs() <= 2 ** -7 * scale).all())


def test_fuse_elementwise_swaps_every_module():
    mlp = GatedMLP(16, 32)
    attention_like = torch.nn.ModuleDict({"rotary": RotaryRotation(), "mlp": mlp})
    counts = fuse_elementwise(attention_like)
    assert counts == {"rotary": 1, "silu_and_mul": 1}
    assert isinstance(attention_like["rotary"], FusedRotaryRotation)
    assert isinstance(mlp.act_fn, FusedSiluAndMul)
    assert fuse_elementwise(attention_like) == {"rotary": 0, "silu_and_mul": 0}
