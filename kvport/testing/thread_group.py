"""Tensor-parallel ranks as threads of one process, on one device.

`run_ranks(size, rank_main)` runs `rank_main(rank, group)` for every rank in its own thread,
with a `ThreadGroup` whose collectives meet through a barrier. The arithmetic of each rank is
that of a real rank (the same sharded layers, matrix shapes and kernels), so a sharded model's
numbers can be checked against the whole model's without a second device or
torch.distributed: the tests do it on the CPU, and plugins/kvport-cuda/bench/tp_numerics.py
on one GPU. Sums are taken in rank order, as a two-rank all-reduce adds them.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import torch

from kvport.models.tp_group import TensorParallelGroup


class _Slots:
    def __init__(self, size: int, timeout_s: float):
        self.barrier = threading.Barrier(size, timeout=timeout_s)
        self.values: list = [None] * size


class ThreadGroup(TensorParallelGroup):
    """Collectives between the threads of `run_ranks`, summing and gathering in rank order."""

    def __init__(self, rank: int, size: int, slots: _Slots):
        super().__init__(rank, size)
        self.slots = slots

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.slots.values[self.rank] = x.clone()
        self.slots.barrier.wait()
        parts = list(self.slots.values)
        self.slots.barrier.wait()            # nobody overwrites a slot before all have read
        return parts

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        parts = self._exchange(x)
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return x.copy_(total)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._exchange(x))

    def gather_to_first(self, x: torch.Tensor, size: int) -> torch.Tensor | None:
        parts = self._exchange(x)
        return torch.cat(parts, dim=-1)[..., :size] if self.is_first else None

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        return x.copy_(self._exchange(x)[0])


def run_ranks(size: int, rank_main: Callable[[int, ThreadGroup], Any],
              timeout_s: float = 600) -> list[Any]:
    """`rank_main(rank, group)` for each rank in a thread; their results in rank order. The
    first exception of any rank is raised here (the others are released from the barrier)."""
    slots = _Slots(size, timeout_s)
    results: list[Any] = [None] * size
    errors: list[BaseException] = []

    def main(rank: int) -> None:
        try:
            results[rank] = rank_main(rank, ThreadGroup(rank, size, slots))
        except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread)
            errors.append(exc)
            slots.barrier.abort()

    threads = [threading.Thread(target=main, args=(r,), name=f"tp-rank-{r}")
               for r in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:      # the cause, not a barrier it broke for the others
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)),
                   errors[0])
    return results
