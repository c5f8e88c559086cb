"""Host-to-device copies of a step's small integer arrays without stalling the host.

A copy from pinned (page-locked) memory is asynchronous: the host goes on preparing while the
GPU copies. The price is that the host buffer must not be rewritten before that copy has read
it, so each buffer remembers an event recorded after its last copy and waits on it (almost
always long done) before it is filled again.
"""
from __future__ import annotations

import numpy as np
import torch

from kvport.attention_backends.triton_paged import pack_aligned


class HostStaging:
    """One reusable host buffer of `dtype` for copies to `device` (pinned on a GPU)."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.int32,
                 size: int = 1 << 16):
        self.device = device
        self.dtype = dtype
        self._pinned = device.type == "cuda"
        self._buffer = self._allocate(size)
        self._last_copy: torch.cuda.Event | None = None

    def _allocate(self, size: int) -> torch.Tensor:
        return torch.empty(size, dtype=self.dtype, pin_memory=self._pinned)

    def to_device(self, array: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy the 1-D `array` to the device (into `out` when given); returns the device
        tensor. Asynchronous on a GPU."""
        n = int(array.size)
        if self._last_copy is not None:
            self._last_copy.synchronize()
        if n > self._buffer.numel():
            self._buffer = self._allocate(max(n, 2 * self._buffer.numel()))
        host = self._buffer[:n]
        host.numpy()[:] = array
        if out is None:
            result = host.to(self.device, non_blocking=self._pinned)
        else:
            result = out[:n]
            result.copy_(host, non_blocking=self._pinned)
        if self._pinned:
            self._last_copy = torch.cuda.Event()
            self._last_copy.record()
        return result

    def parts_to_device(self, parts: list[np.ndarray]) -> list[torch.Tensor]:
        """Copy several 1-D arrays in one transfer; returns a device view of each, every view
        16-byte aligned (see triton_paged.pack_int32)."""
        packed, starts, sizes = pack_aligned(parts)
        device = self.to_device(packed)
        return [device[start:start + n] for start, n in zip(starts, sizes)]
