"""The tensor-parallel all-reduce, the residual add and the RMSNorm after it, in one kernel.

In a tensor-parallel decoder layer each row-parallel matmul (o_proj, down_proj) leaves every
rank a partial sum, and the next thing the layer does is add the sum to the residual stream
and normalise it. Done apart that is an all-reduce kernel (with its own cross-GPU
synchronisation), a copy out of the shared buffer and a norm kernel, 64 times per step of a
32-layer model; on a decode step each is a few microseconds of mostly fixed cost, and none of
it shrinks when the weights are split. Here one Triton kernel does all of it for tensors of
up to `max_rows` rows:

    every rank's row-parallel matmul writes its partial product into its symmetric buffer;
    one program per row: wait until every peer's program for that row has signalled that its
    partial is there; sum the partials of all ranks in rank order (float32, so every rank
    computes the same bits); round to the model dtype, as the all-reduce would return it;
    add the residual, normalise and scale exactly as FusedRMSNorm does; signal the peers
    that the row has been read, and wait for theirs, so that no rank overwrites its buffer
    (the next matmul) while a peer still reads it.

The signals are int32 flags in a second symmetric allocation, one per (row, peer) and phase,
set with a release compare-and-swap at system scope by the sender and cleared with an acquire
compare-and-swap by the receiver, so every call leaves them zero again (and a CUDA graph can
replay the kernel). Reading each peer's whole row (a "one shot") costs more NVLink traffic
than a two-shot all-reduce for large tensors, hence the row limit; larger tensors keep the
separate all-reduce and norm.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvport_cuda.fused_elementwise import round_to_dtype
from kvport_cuda.symmetric_all_reduce import SymmetricMemoryAllReduce

# Above this (256 rows of 4096 bf16) reading every peer's whole tensor loses to a two-shot
# all-reduce (docs/benchmarks.md: one shot 56 us against two shot 40 us at 8 MiB).
DEFAULT_MAX_BYTES = 2 * 2**20


@triton.jit
def _barrier(signal_ptrs, slot, RANK: tl.constexpr, WORLD: tl.constexpr):
    """Signal every peer's flag (slot, RANK), then wait for and clear our flags (slot, peer)."""
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            remote = tl.load(signal_ptrs + peer).to(tl.pointer_type(tl.int32))
            while tl.atomic_cas(remote + slot * WORLD + RANK, 0, 1, sem="release",
                                scope="sys") != 0:
                pass
    local = tl.load(signal_ptrs + RANK).to(tl.pointer_type(tl.int32))
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            while tl.atomic_cas(local + slot * WORLD + peer, 1, 0, sem="acquire",
                                scope="sys") != 1:
                pass


@triton.jit
def _all_reduce_add_rms_norm_kernel(buffer_ptrs, signal_ptrs, res_ptr, out_ptr, res_out_ptr,
                                    w_ptr, n, eps, max_rows, RANK: tl.constexpr,
                                    WORLD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    dtype: tl.constexpr = res_ptr.dtype.element_ty
    _barrier(signal_ptrs, row, RANK=RANK, WORLD=WORLD)        # the peers' partials are in
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    at = row.to(tl.int64) * n + offs
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for rank in tl.static_range(WORLD):                       # rank order on every rank
        part = tl.load(buffer_ptrs + rank).to(tl.pointer_type(dtype))
        total += tl.load(part + at, mask=mask, other=0.0, volatile=True).to(tl.float32)
    r = tl.load(res_ptr + at, mask=mask, other=0.0).to(tl.float32)
    xf = round_to_dtype(round_to_dtype(total, dtype) + r, dtype)     # the sum, + residual
    tl.store(res_out_ptr + at, xf.to(dtype), mask=mask)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / n + eps)
    y = (xf * inv).to(dtype)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    out = w.to(tl.float32) * y.to(tl.float32)
    tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.debug_barrier()                                        # every thread has read its part
    _barrier(signal_ptrs, max_rows + row, RANK=RANK, WORLD=WORLD)   # the peers are done too


class AllReduceNorm:
    """The fused kernel over a SymmetricMemoryAllReduce's buffer (every rank builds one, in
    the same order: the signal allocation is a collective rendezvous)."""

    def __init__(self, fast: SymmetricMemoryAllReduce, hidden_size: int,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        import torch.distributed._symmetric_memory as symm_mem
        self.fast, self.hidden_size = fast, hidden_size
        self.max_rows = self.rows_for(fast, hidden_size, max_bytes)
        device = fast.device
        self.signals = symm_mem.empty(2 * self.max_rows * fast.world_size, dtype=torch.int32,
                                      device=device)
        self.signals.zero_()
        handle = symm_mem.rendezvous(self.signals, fast.group_name)
        torch.cuda.synchronize(device)
        handle.barrier()                     # every rank's flags are zero before any is set
        self._signal_handle = handle
        self.signal_ptrs = torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device)
        self.buffer_ptrs = torch.tensor(fast.buffer_ptrs, dtype=torch.int64, device=device)
        self.rank, self.world_size = fast.rank, fast.world_size

    @staticmethod
    def rows_for(fast: SymmetricMemoryAllReduce, hidden_size: int,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> int:
        """The most rows the fused kernel takes: up to `max_bytes` of partial sums."""
        limit = min(max_bytes, fast.limits.max_bytes)
        return max(1, limit // (hidden_size * fast.dtype.itemsize))

    def takes(self, rows: int, width: int, dtype: torch.dtype) -> bool:
        """Whether a [rows, width] partial of `dtype` goes through the fused kernel."""
        return (width == self.hidden_size and dtype == self.fast.dtype
                and 0 < rows <= self.max_rows)

    def stage_product(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        """x W^T written into this rank's symmetric buffer (the partial that
        `all_reduce_add_rms_norm` sums), or None if the fused kernel would not take it."""
        rows = x.numel() // x.shape[-1]
        if torch.is_grad_enabled() or not x.is_cuda or not self.takes(rows, weight.shape[0],
                                                                      x.dtype):
            return None
        staged = self.fast.staging_for((rows, weight.shape[0]), x.dtype)
        torch.mm(x.reshape(rows, x.shape[-1]), weight.t(), out=staged)
        return staged

    def holds(self, x: torch.Tensor) -> bool:
        """Whether `x` is a partial left by `stage_product` (it starts the shared buffer)."""
        return (x.is_cuda and x.data_ptr() == self.fast.buffer.data_ptr()
                and self.takes(x.numel() // x.shape[-1], x.shape[-1], x.dtype))

    def all_reduce_add_rms_norm(self, partial: torch.Tensor, residual: torch.Tensor,
                                weight: torch.Tensor, eps: float
                                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(sum + residual), sum + residual) for the staged `partial` [rows, hidden]."""
        rows, n = partial.shape
        out = torch.empty(partial.shape, dtype=torch.result_type(weight, partial),
                          device=partial.device)
        res_out = torch.empty_like(residual)
        block = triton.next_power_of_2(n)
        _all_reduce_add_rms_norm_kernel[(rows,)](
            self.buffer_ptrs, self.signal_ptrs, residual, out, res_out, weight, n, eps,
            self.max_rows, RANK=self.rank, WORLD=self.world_size, BLOCK=block,
            num_warps=max(1, min(8, block // 256)))
        return out, res_out
