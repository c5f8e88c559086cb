"""kvport-cpu's native int8 kernels (csrc/int8_rows.cpp, csrc/int8_linear.h) against the
torch ops of kvport/models/quantization.py they replace: bit-identical outputs, clear errors,
and the CPU worker wiring them into `--quantization int8` models.

The first test in a process builds the extension (~20 s on 2 cores, cached on disk after)."""
from __future__ import annotations

import pytest
import torch

from kvport.models.quantization import Int8DynamicLinear, Int8RowKernels


@pytest.fixture(scope="module")
def kernels() -> Int8RowKernels:
    from kvport_cpu.native import int8_linear_op, int8_row_ops
    built = int8_row_ops()
    if built.op is None:
        pytest.skip(f"native int8 row kernels unavailable: {built.reason}")
    return Int8RowKernels(quantize=built.op, rescale=built.out, linear=int8_linear_op().op)


def torch_quantize(x: torch.Tensor):
    """quantization.py's torch ops for the activations, written out."""
    scale = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127.0)
    return x.div(scale).round_().to(torch.int8), scale


@pytest.mark.parametrize("rows, cols", [(1, 576), (7, 1536), (64, 64), (3, 1)])
def test_quantize_rows_is_bit_identical(kernels, rows, cols):
    g = torch.Generator().manual_seed(rows * cols)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 2, rows)[:, None]
    x[0, 0] = 0.0
    if rows > 2:
        x[2] = 0.0                               # an all-zero row: scale 1e-12 / 127, q 0
    q, scale = kernels.quantize(x)
    q_ref, scale_ref = torch_quantize(x)
    assert q.dtype == torch.int8 and scale.shape == (rows, 1)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)


@pytest.mark.parametrize("rows, cols, bias", [(1, 49152, False), (32, 3072, True),
                                              (5, 7, True)])
def test_rescale_rows_is_bit_identical(kernels, rows, cols, bias):
    g = torch.Generator().manual_seed(cols)
    acc = torch.randint(-2**30, 2**30, (rows, cols), generator=g, dtype=torch.int32)
    scale = torch.rand(rows, 1, generator=g) * 1e-3
    weight_scale = torch.rand(cols, generator=g) * 1e-2
    b = torch.randn(cols, generator=g) if bias else None
    got = kernels.rescale(acc, scale, weight_scale, b)
    expected = torch.mul(acc, scale).mul_(weight_scale)
    if b is not None:
        expected.add_(b)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_linear_with_kernels_equals_the_torch_path(kernels):
    g = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(96, 64, generator=g) * 0.05, torch.randn(96, generator=g)
    plain = Int8DynamicLinear(weight, bias)
    native = Int8DynamicLinear(weight, bias, kernels)
    halves = Int8DynamicLinear(weight, bias, Int8RowKernels(kernels.quantize, kernels.rescale))
    for rows in (1, 4, 33):
        x = torch.randn(2, rows, 64, generator=g)
        assert torch.equal(native(x), plain(x)) and torch.equal(halves(x), plain(x))


# int8_linear: every row count of the weight-streaming product (1..8, each its own unrolled
# kernel) and past it (_int_mm); K with and without a partial 64-byte tail; N not a
# multiple of the 4 rows the kernel takes at a time.
@pytest.mark.parametrize("out_features, in_features", [(3072, 576), (576, 1536), (37, 70),
                                                       (5, 3), (1000, 4160)])
def test_int8_linear_is_bit_identical(kernels, out_features, in_features):
    g = torch.Generator().manual_seed(out_features + in_features)
    weight = torch.randn(out_features, in_features, generator=g) * 0.05
    weight[0] = 0.0                                   # an all-zero weight row
    layer = Int8DynamicLinear(weight, torch.randn(out_features, generator=g))
    unbiased = Int8DynamicLinear(weight, None)
    for rows in (*range(1, 10), 33):
        x = torch.randn(rows, in_features, generator=g) * 3
        got = kernels.linear(x, layer.qweight, layer.weight_scale, layer.bias)
        assert torch.equal(got, layer(x)), rows       # layer(x): the torch ops
        got = kernels.linear(x, unbiased.qweight, unbiased.weight_scale, None)
        assert torch.equal(got, unbiased(x)), rows


def test_int8_linear_extremes_are_exact(kernels):
    """All weights and activations at +-127 over K = 4096: the largest int32 sums the
    shifted (unsigned) activations of the VNNI product can reach, against _int_mm."""
    K = 4096
    sign = torch.tensor([1.0, -1.0]).repeat(K // 2)
    weight = torch.stack([sign, -sign, torch.ones(K), -torch.ones(K)])
    layer = Int8DynamicLinear(weight, None)
    x = torch.stack([sign, torch.ones(K), -torch.ones(K)])
    assert torch.equal(kernels.linear(x, layer.qweight, layer.weight_scale, None), layer(x))


def test_int8_linear_refuses_bad_inputs(kernels):
    q = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="2-D float32"):
        kernels.linear(torch.zeros(2, 8, dtype=torch.float64), q, torch.ones(4), None)
    with pytest.raises(RuntimeError, match=r"contiguous int8 \[N, K=6\]"):
        kernels.linear(torch.zeros(2, 6), q, torch.ones(4), None)
    with pytest.raises(RuntimeError, match="one float32 per output row"):
        kernels.linear(torch.zeros(2, 8), q, torch.ones(3), None)
    with pytest.raises(RuntimeError, match="bias must hold"):
        kernels.linear(torch.zeros(2, 8), q, torch.ones(4), torch.ones(5))


def test_bad_inputs_are_refused_clearly(kernels):
    with pytest.raises(RuntimeError, match="2-D float32"):
        kernels.quantize(torch.zeros(4, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="one float32 per column"):
        kernels.rescale(torch.zeros(2, 3, dtype=torch.int32), torch.ones(2, 1),
                        torch.ones(4), None)


def test_cpu_worker_uses_them_for_int8(kernels, tiny_llama_dir, monkeypatch):
    from kvport import LLM, SamplingParams
    from kvport_cpu.worker import CpuWorker
    # decode steps on the modules too, so that every step goes through the kernels compared
    monkeypatch.setattr(CpuWorker, "use_native_decoder", False)
    llm = LLM(model=tiny_llama_dir, quantization="int8", max_num_seqs=4)
    layers = [m for m in llm.engine.worker.model.modules() if isinstance(m, Int8DynamicLinear)]
    assert layers and all(m.kernels == kernels for m in layers)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    got = llm.generate([[5, 6, 7, 8]], params, use_tqdm=False)[0].outputs[0].token_ids
    for m in layers:
        m.kernels = None                          # the torch ops: the same tokens
    assert llm.generate([[5, 6, 7, 8]], params, use_tqdm=False)[0].outputs[0].token_ids == got
    llm.engine.shutdown()


def test_plain_loop_product_is_bit_identical(kernels, tmp_path, monkeypatch):
    """The int8 product that CPUs without AVX-512 VNNI compile (gemv_rows_plain), built here
    with VNNI turned off under another library name, against the torch ops."""
    import os
    import platform

    from torch.utils import cpp_extension

    from kvport_cpu import native
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the VNNI switch is an x86 compiler flag")
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        if "avx512_vnni" not in f.read():
            pytest.skip("this CPU builds the plain-loop product already (no AVX-512 VNNI)")
    with open(os.path.join(native._CSRC, "int8_rows.cpp"), encoding="utf-8") as f:
        source = f.read().replace("kvport_cpu_int8", "kvport_cpu_int8_plain_test")
    (tmp_path / "int8_plain.cpp").write_text(source)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    cpp_extension.load(name="kvport_cpu_int8_plain_test",
                       sources=[str(tmp_path / "int8_plain.cpp")],
                       extra_include_paths=[native._CSRC],
                       extra_cflags=native._cflags() + ["-mno-avx512vnni"],
                       extra_ldflags=native._openmp_flags(), is_python_module=False)
    plain = torch.ops.kvport_cpu_int8_plain_test.int8_linear
    g = torch.Generator().manual_seed(11)
    for out_features, in_features in ((3072, 576), (37, 70)):
        layer = Int8DynamicLinear(torch.randn(out_features, in_features, generator=g) * 0.05,
                                  torch.randn(out_features, generator=g))
        for rows in (1, 2, 5, 8, 9):
            x = torch.randn(rows, in_features, generator=g)
            assert torch.equal(plain(x, layer.qweight, layer.weight_scale, layer.bias),
                               layer(x)), (out_features, in_features, rows)
