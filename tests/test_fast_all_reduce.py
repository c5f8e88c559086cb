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
