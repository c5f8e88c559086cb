"""The tensor-parallel all-reduce of decode-sized tensors through PyTorch symmetric memory.

NCCL's all-reduce is built for bandwidth; for the 0.1-4 MiB tensors a decode step sums twice
per layer its fixed cost (protocol set-up, several kernel phases) dominates. Here every rank
owns one buffer that the other ranks can read and write over NVLink (peer-to-peer; NVLink
multicast is not used). A rank's input goes into its buffer (the row-parallel matmul writes
its product there directly, `staging_for`; other tensors are copied in), then one kernel sums:

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
        self.rank, self.world_size = handle.rank, handle.world_size
        self._ops = torch.ops.symm_mem

    def handles(self, x: torch.Tensor) -> bool:
        return (x.device == self.device and x.is_contiguous()
                and self._fits(x.numel(), x.dtype))

    def _fits(self, numel: int, dtype: torch.dtype) -> bool:
        # float32: the sums of ParallelConfig.tp_reduce_dtype "float32"
        return (dtype in (self.dtype, torch.float32)
                and numel * dtype.itemsize <= self.limits.max_bytes
                and numel % 4 == 0)          # the kernels move at least 8 bytes at a time

    def staging_for(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """The start of this rank's symmetric buffer, viewed as `shape`: a row-parallel matmul
        writes its partial product there and `all_reduce_staged` sums it without copying it
        in. Valid until the next all-reduce. None for a tensor this all-reduce does not take."""
        numel = 1
        for size in shape:
            numel *= size
        if not self._fits(numel, dtype):
            return None
        # one allocation, viewed in the tensor's dtype (the kernels find it by its storage)
        return self.buffer.view(dtype)[:numel].view(shape)

    def all_reduce_staged(self, staged: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of every rank's `staged` (from `staging_for`), in a new
        tensor of its shape."""
        out = torch.empty_like(staged)
        self._reduce(staged.view(-1), out.view(-1))
        return out

    def all_reduce_(self, x: torch.Tensor) -> None:
        flat = x.view(-1)
        staged = self.staging_for(tuple(flat.shape), flat.dtype)
        staged.copy_(flat)
        self._reduce(staged, flat)

    def _reduce(self, staged: torch.Tensor, out: torch.Tensor) -> None:
        """out = the sum of `staged` (1-D, in the buffer) over the ranks."""
        if staged.numel() * staged.element_size() <= self.limits.one_shot_max_bytes:
            self._ops.one_shot_all_reduce_out(staged, "sum", self.group_name, out)
        else:
            self._ops.two_shot_all_reduce_(staged, "sum", self.group_name)
            out.copy_(staged)


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
