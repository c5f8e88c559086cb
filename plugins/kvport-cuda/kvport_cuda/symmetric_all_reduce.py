"""The tensor-parallel all-reduce of decode-sized tensors through PyTorch symmetric memory.

NCCL's all-reduce is built for bandwidth; for the 0.1-4 MiB tensors a decode step sums twice
per layer its fixed cost (protocol set-up, several kernel phases) dominates. Here every rank
owns one buffer that the other ranks can read and write over NVLink (peer-to-peer; NVLink
multicast is not used). A rank copies its input into its buffer, then one kernel sums:

* one shot: each rank reads every peer's whole buffer and adds (least latency, small sizes);
* two shot: each rank reduces its 1/N of the elements and writes them to every peer (less
  traffic per rank, larger sizes).

Both kernels synchronise the ranks through signal pads in the same memory, so they can be
captured in CUDA graphs, and consecutive calls may reuse the one buffer. Tensors of another
dtype, larger than the buffer, or not in the worker's device take NCCL (`handles`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SymmetricAllReduceLimits:
    """Which tensors go through symmetric memory, and which kernel sums them."""
    max_bytes: int = 8 * 2**20          # the buffer; larger tensors (prefill) take NCCL
    one_shot_max_bytes: int = 512 * 2**10


class SymmetricMemoryAllReduce:
    """A FastAllReduce (kvport/models/tp_group.py) over the default process group."""

    def __init__(self, device: torch.device, dtype: torch.dtype,
                 limits: SymmetricAllReduceLimits = SymmetricAllReduceLimits()):
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = dist.group.WORLD.group_name
        self.device, self.dtype, self.limits = device, dtype, limits
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:          # required by older PyTorch, a no-op in newer ones
            enable(self.group_name)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        self.buffer = symm_mem.empty(limits.max_bytes // itemsize, dtype=dtype, device=device)
        handle = symm_mem.rendezvous(self.buffer, self.group_name)
        if handle is None:
            raise RuntimeError("symmetric-memory rendezvous returned no handle")
        handle.barrier()
        self._handle = handle           # keeps the peers' mappings alive
        self._ops = torch.ops.symm_mem

    def handles(self, x: torch.Tensor) -> bool:
        # float32: the sums of ParallelConfig.tp_reduce_dtype "float32"
        return (x.dtype in (self.dtype, torch.float32) and x.device == self.device
                and x.is_contiguous()
                and x.numel() * x.element_size() <= self.limits.max_bytes
                and x.numel() % 4 == 0)      # the kernels move at least 8 bytes at a time

    def all_reduce_(self, x: torch.Tensor) -> None:
        flat = x.view(-1)
        # one allocation, viewed in the tensor's dtype (the kernels find it by its storage)
        staged = self.buffer.view(x.dtype)[:flat.numel()]
        staged.copy_(flat)
        if flat.numel() * flat.element_size() <= self.limits.one_shot_max_bytes:
            self._ops.one_shot_all_reduce_out(staged, "sum", self.group_name, flat)
        else:
            self._ops.two_shot_all_reduce_(staged, "sum", self.group_name)
            flat.copy_(staged)


def symmetric_all_reduce_or_reason(device: torch.device, dtype: torch.dtype,
                                   world_size: int) -> tuple[SymmetricMemoryAllReduce | None, str]:
    """The symmetric-memory all-reduce for this rank, or None and why it is unavailable.

    Every rank must call this (the rendezvous is collective), and every rank must reach the
    same answer: the peers-can-reach-each-other check runs on each rank's view of all GPUs.
    """
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError as exc:
        return None, f"this PyTorch has no symmetric memory ({exc})"
    count = torch.cuda.device_count()
    if count < world_size:
        return None, f"{world_size} ranks but {count} visible GPUs"
    blocked = [(a, b) for a in range(world_size) for b in range(world_size)
               if a != b and not torch.cuda.can_device_access_peer(a, b)]
    if blocked:
        return None, f"GPUs without peer-to-peer access: {blocked}"
    try:
        return SymmetricMemoryAllReduce(device, dtype), "symmetric memory"
    except Exception as exc:        # reported by the caller, which keeps NCCL
        return None, f"symmetric-memory set-up failed: {type(exc).__name__}: {exc}"
