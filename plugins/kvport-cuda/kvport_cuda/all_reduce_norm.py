"""The tensor-parallel all-reduce, the residual add and the RMSNorm after it, in one kernel.

In a tensor-parallel decoder layer each row-parallel matmul (o_proj, down_proj) leaves every
rank a partial sum, and the next thing the layer does is add the sum to the residual stream
and normalise it. Done apart that is an all-reduce kernel (which synchronises the GPUs twice:
before reading the peers' inputs and before anyone may overwrite them), a copy and a norm
kernel, 64 times per step of a 32-layer model; on a decode step each is a few microseconds of
mostly fixed cost, and none of it shrinks when the weights are split. Here one Triton kernel
does all of it for up to `max_rows` rows, with one synchronisation:

    every rank's row-parallel matmul writes its partial product into its own region of a
    symmetric allocation (one the other GPUs can read over NVLink);
    the kernel's first program signals the peers and waits for their signals (so every
    peer's partial is complete) while the others wait for it; then each program, for each
    of its rows, sums the partials of all ranks in rank order (float32: every rank computes
    the same bits), rounds the sum to the model dtype as an all-reduce would return it,
    adds the residual, normalises and scales exactly as FusedRMSNorm does.

No second synchronisation is needed because the matmul/norm pairs alternate between two
regions (`region` = the pair's index modulo 2, fixed per layer, so captured CUDA graphs and
eager steps agree): a rank overwrites region A only after its next kernel, on region B, has
had every peer's signal, and a peer signals only from that next kernel, when it has finished
reading region A. Every step runs all its pairs through the kernel or none (they share the
step's row count), so consecutive fused calls always alternate.

The signals are int32 flags in another symmetric allocation, one per peer, set with a
release compare-and-swap at system scope by the sender and cleared with an acquire
compare-and-swap by the receiver, so every call leaves them zero again and a CUDA graph can
replay the kernel. Only program 0 of each rank exchanges them; the other programs wait for
it on their own GPU (`_wait_for_the_peers`), so a call costs one signal per peer, not one per
program. Reading every peer's whole tensor (a "one shot") moves more NVLink traffic than a
two-shot all-reduce for large tensors, hence the row limit; larger tensors (prefill chunks)
keep the separate all-reduce and norm. The peers' pointers come from memory, so the loads
carry an alignment hint: without it every row was read two bytes at a time and 256 rows took
56 us instead of 13 (docs/benchmarks.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvport_cuda.symmetric_all_reduce import SymmetricMemoryAllReduce
from kvport_cuda.triton_math import rms_normalise, round_to_dtype

# The fused kernel was measured up to 256 rows of 4096 bf16 (2 MiB), where it beat the
# separate all-reduce and norm at every size; beyond, torch's one-shot all-reduce already
# lost to its two-shot one (56 against 40 us at 8 MiB), so larger tensors keep the separate
# path (docs/benchmarks.md).
DEFAULT_MAX_BYTES = 2 * 2**20


@triton.jit
def _barrier(signal_ptrs, RANK: tl.constexpr, WORLD: tl.constexpr):
    """Set our flag on every peer (its flag RANK), then wait for and clear our flag of each
    peer."""
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            remote = tl.load(signal_ptrs + peer).to(tl.pointer_type(tl.int32))
            while tl.atomic_cas(remote + RANK, 0, 1, sem="release", scope="sys") != 0:
                pass
    local = tl.load(signal_ptrs + RANK).to(tl.pointer_type(tl.int32))
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            while tl.atomic_cas(local + peer, 1, 0, sem="acquire", scope="sys") != 1:
                pass


@triton.jit
def _wait_for_the_peers(signal_ptrs, counters_ptr, PROGRAMS: tl.constexpr, RANK: tl.constexpr,
                        WORLD: tl.constexpr):
    """Program 0 synchronises with the peers; the others wait for it on this GPU.

    The others learn that it has by a local counter: each call's PROGRAMS tickets form one epoch
    (a call starts only after the previous one has finished), and program 0 publishes the
    epoch it has synchronised. int64 counters never wrap."""
    ticket = tl.atomic_add(counters_ptr, 1, sem="relaxed", scope="gpu")
    epoch = ticket // PROGRAMS
    if tl.program_id(0) == 0:
        _barrier(signal_ptrs, RANK=RANK, WORLD=WORLD)
        tl.atomic_xchg(counters_ptr + 1, epoch + 1, sem="release", scope="gpu")
    else:
        while tl.load(counters_ptr + 1, volatile=True) <= epoch:
            pass
        tl.atomic_add(counters_ptr + 1, 0, sem="acquire", scope="gpu")   # orders what follows


@triton.jit
def _all_reduce_add_rms_norm_kernel(partial_ptrs, region_offset, signal_ptrs, counters_ptr,
                                    res_ptr, out_ptr, res_out_ptr, w_ptr, rows, n, eps,
                                    PROGRAMS: tl.constexpr, RANK: tl.constexpr,
                                    WORLD: tl.constexpr, BLOCK: tl.constexpr):
    dtype: tl.constexpr = res_ptr.dtype.element_ty
    _wait_for_the_peers(signal_ptrs, counters_ptr, PROGRAMS=PROGRAMS, RANK=RANK, WORLD=WORLD)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for row in range(tl.program_id(0), rows, PROGRAMS):
        at = row.to(tl.int64) * n + offs
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for rank in tl.static_range(WORLD):                   # rank order on every rank
            part = tl.load(partial_ptrs + rank).to(tl.pointer_type(dtype)) + region_offset
            # 16-byte aligned (allocations are, and regions are whole rows): without the hint
            # the compiler cannot vectorise through a pointer it loaded, and a row costs
            # 4096 two-byte reads over NVLink. .cg: at L2 (the peer's), never a stale L1 line.
            part = tl.multiple_of(part, 16)
            total += tl.load(part + at, mask=mask, other=0.0,
                             cache_modifier=".cg").to(tl.float32)
        r = tl.load(res_ptr + at, mask=mask, other=0.0).to(tl.float32)
        xf = round_to_dtype(round_to_dtype(total, dtype) + r, dtype)   # the sum, + residual
        tl.store(res_out_ptr + at, xf.to(dtype), mask=mask)
        out = rms_normalise(xf, w, n, eps, dtype)
        tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=mask)


class AllReduceNorm:
    """The fused kernel and its two partial-sum regions, for the process group of a
    SymmetricMemoryAllReduce (every rank builds one, in the same order: the allocations are
    collective rendezvous)."""

    max_programs = 128                 # programs per call (all resident: they wait on one)

    def __init__(self, fast: SymmetricMemoryAllReduce, hidden_size: int,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        self.fast, self.hidden_size, self.dtype = fast, hidden_size, fast.dtype
        self.max_rows = self.rows_for(hidden_size, fast.dtype, max_bytes)
        self.region_size = self.max_rows * hidden_size          # elements per region
        self._handles: list = []                                # keep the mappings alive
        self.partials, self.partial_ptrs = self._shared(2 * self.region_size, fast.dtype)
        self.signals, self.signal_ptrs = self._shared(fast.world_size, torch.int32)
        self.counters = torch.zeros(2, dtype=torch.int64, device=fast.device)
        # one program per SM at most, so that every program is resident while they wait
        sms = torch.cuda.get_device_properties(fast.device).multi_processor_count
        self.programs = min(self.max_programs, sms)
        self.rank, self.world_size = fast.rank, fast.world_size

    def _shared(self, numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A zeroed symmetric allocation and every rank's pointer to it (on the device)."""
        import torch.distributed._symmetric_memory as symm_mem
        device = self.fast.device
        tensor = symm_mem.empty(numel, dtype=dtype, device=device)
        tensor.zero_()
        handle = symm_mem.rendezvous(tensor, self.fast.group_name)
        torch.cuda.synchronize(device)
        handle.barrier()                          # zero everywhere before any rank uses it
        self._handles.append(handle)
        return tensor, torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device)

    @staticmethod
    def rows_for(hidden_size: int, dtype: torch.dtype,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> int:
        """The most rows the fused kernel takes: up to `max_bytes` of partial sums."""
        return max(1, max_bytes // (hidden_size * dtype.itemsize))

    def takes(self, rows: int, width: int, dtype: torch.dtype) -> bool:
        """Whether a [rows, width] partial of `dtype` goes through the fused kernel."""
        return width == self.hidden_size and dtype == self.dtype and 0 < rows <= self.max_rows

    def region_view(self, region: int, rows: int) -> torch.Tensor:
        """This rank's partial-sum `region` (0 or 1) as [rows, hidden]."""
        start = region * self.region_size
        return self.partials[start:start + rows * self.hidden_size].view(rows, self.hidden_size)

    def stage_product(self, x: torch.Tensor, weight: torch.Tensor,
                      region: int) -> torch.Tensor | None:
        """x W^T written into this rank's `region` (the partial that `all_reduce_add_rms_norm`
        sums), or None if the fused kernel would not take it."""
        rows = x.numel() // x.shape[-1]
        if torch.is_grad_enabled() or not x.is_cuda or not self.takes(rows, weight.shape[0],
                                                                      x.dtype):
            return None
        staged = self.region_view(region, rows)
        torch.mm(x.reshape(rows, x.shape[-1]), weight.t(), out=staged)
        return staged

    def holds(self, x: torch.Tensor, region: int) -> bool:
        """Whether `x` is a partial that `stage_product` left in `region`."""
        rows = x.numel() // x.shape[-1]
        return (x.is_cuda and self.takes(rows, x.shape[-1], x.dtype)
                and x.data_ptr() == self.region_view(region, rows).data_ptr())

    def sum_partial(self, partial: torch.Tensor) -> torch.Tensor:
        """The plain all-reduce of a staged partial, into a tensor of its own."""
        summed = partial.clone()
        self.fast.all_reduce_(summed)
        return summed

    def all_reduce_add_rms_norm(self, partial: torch.Tensor, residual: torch.Tensor,
                                weight: torch.Tensor, eps: float, region: int
                                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(sum + residual), sum + residual) for the staged `partial` [rows, hidden] in
        `region` (every rank calls this with the same shapes, in the same order)."""
        rows, n = partial.shape
        out = torch.empty(partial.shape, dtype=torch.result_type(weight, partial),
                          device=partial.device)
        res_out = torch.empty_like(residual)
        block = triton.next_power_of_2(n)
        _all_reduce_add_rms_norm_kernel[(self.programs,)](
            self.partial_ptrs, region * self.region_size, self.signal_ptrs, self.counters,
            residual, out, res_out, weight, rows, n, eps, PROGRAMS=self.programs,
            RANK=self.rank, WORLD=self.world_size, BLOCK=block,
            num_warps=max(1, min(8, block // 256)))
        return out, res_out
