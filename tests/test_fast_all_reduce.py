"""The platform all-reduce hook of the tensor-parallel group, its switch, and kvport-cuda's
symmetric-memory all-reduce where no GPU is present (it must say why it is unavailable).

The symmetric-memory kernels themselves run only on GPUs: plugins/kvport-cuda/bench/all_reduce.py
checks them against the exact sum and times them (docs/benchmarks.md says where it ran)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from kvport.models.tp_group import SINGLE_GROUP, TensorParallelGroup


class RecordingAllReduce:
    """Takes the tensors up to `max_numel` elements and adds 100 to them."""

    def __init__(self, max_numel: int):
        self.max_numel = max_numel
        self.calls: list[int] = []

    def handles(self, x: torch.Tensor) -> bool:
        return x.numel() <= self.max_numel

    def all_reduce_(self, x: torch.Tensor) -> None:
        self.calls.append(x.numel())
        x.add_(100)

    def staging_for(self, shape, dtype):
        return None                                  # no buffer of its own: copies in

    def all_reduce_staged(self, staged):
        raise AssertionError("staging_for offered no buffer")


class StagingAllReduce(RecordingAllReduce):
    """Offers its own buffer for the product; its "sum" adds 1000."""

    def __init__(self, max_numel: int):
        super().__init__(max_numel)
        self.buffer = torch.full((max_numel,), float("nan"))
        self.staged_calls: list[int] = []

    def staging_for(self, shape, dtype):
        numel = int(torch.Size(shape).numel())
        return self.buffer[:numel].view(shape) if numel <= self.max_numel else None

    def all_reduce_staged(self, staged):
        assert staged.data_ptr() == self.buffer.data_ptr()
        self.staged_calls.append(staged.numel())
        return staged + 1000


def test_group_routes_by_what_the_platform_handles(monkeypatch):
    backend_calls: list[int] = []
    monkeypatch.setattr(dist, "all_reduce", lambda x: backend_calls.append(x.numel()))
    group = TensorParallelGroup(rank=1, world_size=2)
    assert group.fast_all_reduce is None
    group.all_reduce(torch.zeros(8))
    assert backend_calls == [8]                      # no platform all-reduce: the backend's

    fast = RecordingAllReduce(max_numel=16)
    group.fast_all_reduce = fast
    small, large = torch.zeros(16), torch.zeros(17)
    assert group.all_reduce(small) is small and torch.equal(small, torch.full((16,), 100.0))
    group.all_reduce(large)
    assert fast.calls == [16] and backend_calls == [8, 17]
    assert torch.equal(large, torch.zeros(17))       # the backend (faked) left it alone


def test_one_rank_never_reduces():
    fast = RecordingAllReduce(max_numel=10**9)
    group = TensorParallelGroup()
    group.fast_all_reduce = fast
    x = torch.ones(4)
    assert torch.equal(group.all_reduce(x), torch.ones(4)) and fast.calls == []
    assert SINGLE_GROUP.fast_all_reduce is None


@torch.inference_mode()
def test_row_parallel_product_goes_into_the_all_reduce_buffer(monkeypatch):
    """The row-parallel matmul writes its partial product where the platform's all-reduce
    reads it; a product the platform does not take is computed apart and reduced as before."""
    from kvport.models.parallel_layers import RowParallelLinear
    backend_calls: list[int] = []
    monkeypatch.setattr(dist, "all_reduce", lambda x: backend_calls.append(x.numel()))
    group = TensorParallelGroup(rank=0, world_size=2)
    layer = RowParallelLinear(8, 0, 4, 6, bias=True, tp=group)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)))
        layer.bias.copy_(torch.arange(6.0))
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    product = x @ layer.weight.t()

    fast = StagingAllReduce(max_numel=18)
    group.fast_all_reduce = fast
    out = layer(x)
    assert fast.staged_calls == [18] and fast.calls == [] and backend_calls == []
    assert torch.allclose(fast.buffer.view(3, 6), product)          # written there, in place
    assert torch.allclose(out, product + 1000 + layer.bias)

    bigger = torch.randn(4, 4)                                       # 24 > 18 elements
    out = layer(bigger)
    assert fast.staged_calls == [18] and backend_calls == [24]       # NCCL's way, no staging
    assert torch.allclose(out, bigger @ layer.weight.t() + layer.bias)

    group.fast_all_reduce = RecordingAllReduce(max_numel=18)          # no buffer offered
    assert torch.allclose(layer(x), product + 100 + layer.bias)


@pytest.mark.parametrize("flags, expected", [([], True), (["--custom-all-reduce"], True),
                                             (["--no-custom-all-reduce"], False)])
def test_cli_switch_reaches_the_config(flags, expected):
    from kvport.api.cli import build_parser, engine_config_from_args
    args = build_parser().parse_args(["serve", "-tp", "2", *flags])
    config = engine_config_from_args(args)
    assert config.parallel.custom_all_reduce is expected
    assert config.parallel.tensor_parallel_size == 2


def test_symmetric_all_reduce_says_why_it_is_unavailable():
    pytest.importorskip("kvport_cuda")
    from kvport_cuda.symmetric_all_reduce import symmetric_all_reduce_or_reason
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has GPUs: the benchmark checks the real thing")
    fast, reason = symmetric_all_reduce_or_reason(torch.device("cpu"), torch.bfloat16, 2)
    assert fast is None
    assert "visible GPUs" in reason or "no symmetric memory" in reason, reason
