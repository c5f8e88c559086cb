"""Paged attention in Triton for GPUs (CUDA, ROCm): the `triton_paged` backend.

Same KV cache layout as the reference ([2, num_blocks, block_size, num_kv_heads, head_size]),
so the two are interchangeable on one cache. Per layer, `forward` launches:

* `write_kv_kernel`: one program per new token scatters its key and value into its slot;
* a pure-decode step (every request has one query token): `paged_decode_kernel` over
  (requests, KV heads, splits), plus `decode_reduce_kernel` when the context is split
  (split-KV: long contexts with few requests still fill the GPU);
* any other step: `paged_attention_kernel` over (query tiles, KV heads), where a tile is up to
  `BLOCK_M // G` query tokens of one request, so prefill chunks and decode tokens of a mixed
  batch run in one launch.

`build_metadata` runs once per step and moves every integer array the kernels need to the
device in ONE copy (they are packed into one int32 buffer). `decode_metadata` builds the
decode metadata from tensors the caller already holds on the device: that is what a CUDA
graph captures (fixed batch size, persistent buffers refilled before each replay).

Imported lazily (the registry imports it when the backend is selected), so importing kvport
never imports Triton. Launch parameters come from `TritonLaunchConfig`; a platform overrides
them by subclassing the backend (kvport-rocm does).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvport.attention_backends import triton_kernels as K
from kvport.attention_backends.interface import (AttentionBackend, AttentionSpec,
                                                 CommonAttentionMetadata,
                                                 UnsupportedAttentionConfig)

LOG2E = 1.4426950408889634
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TritonLaunchConfig:
    """Tile sizes and launch settings. Defaults are tuned on an H100 (docs/benchmarks.md)."""
    prefill_block_m: int = 64          # query rows (tokens x group heads) per program
    prefill_block_n: int = 64          # keys per inner iteration
    prefill_warps: int = 4
    prefill_stages: int = 2
    decode_block_n: int = 64
    decode_warps: int = 4
    decode_stages: int = 2
    # Split-KV: split a decode batch's contexts until about this many programs per SM run
    # (requests x KV heads x splits), never into more than `max_splits` pieces and never
    # into pieces shorter than `min_split_tokens`.
    decode_programs_per_sm: int = 2
    max_splits: int = 16
    min_split_tokens: int = 512

    def block_n(self, head_size: int, decode: bool) -> int:
        """Key tile: halved for head size 256 so the [rows, D] accumulator fits registers;
        doubled for decode at head size 64 and below, where a 64-key tile is only 8 KiB
        (measured on an H200: 73.6% of copy bandwidth instead of 71.2% at W1's decode
        shape, docs/benchmarks.md)."""
        n = self.decode_block_n if decode else self.prefill_block_n
        if head_size > 128:
            return max(16, n // 2)
        return 2 * n if decode and head_size <= 64 else n

    def warps(self, head_size: int, decode: bool) -> int:
        """Warps per program: doubled for head size 256 prefill tiles ([64, 256] float32
        accumulators would spill with four)."""
        if decode:
            return self.decode_warps
        return 2 * self.prefill_warps if head_size > 128 else self.prefill_warps


@dataclass
class TritonPagedMetadata:
    """One step's device tensors (int32) and the launch shape chosen for it."""
    slot_mapping: torch.Tensor         # [num_tokens]; negative: write nothing
    seq_lens: torch.Tensor             # [num_reqs]
    block_table: torch.Tensor          # [num_reqs, max_blocks]
    decode_only: bool
    num_splits: int = 1                # decode only
    query_start_loc: torch.Tensor | None = None   # mixed only: [num_reqs + 1]
    tile_req: torch.Tensor | None = None          # mixed only: [num_tiles]
    tile_q0: torch.Tensor | None = None           # mixed only: [num_tiles]


def _empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every output and workspace buffer comes from here; tests poison it."""
    return torch.empty(shape, dtype=dtype, device=device)


def pack_int32(parts: list[np.ndarray], device) -> list[torch.Tensor]:
    """Copy int32 arrays to `device` in one transfer; returns a 1-D view per array.

    Each view starts on a 16-byte boundary: Triton specializes a kernel on whether each
    pointer argument is 16-byte aligned, so views at varying offsets would compile new
    kernel variants step after step (about a second each)."""
    packed, starts, sizes = pack_aligned(parts)
    device_packed = torch.from_numpy(packed).to(device)
    return [device_packed[start:start + n] for start, n in zip(starts, sizes)]


def pack_aligned(parts: list[np.ndarray], out: np.ndarray | None = None
                 ) -> tuple[np.ndarray, list[int], list[int]]:
    """(one int32 array holding `parts`, each at a multiple of 4 elements; their starts;
    their sizes). Writes into `out` (which must be large enough) when given."""
    sizes = [int(p.size) for p in parts]
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + -(-n // 4) * 4)
    packed = np.empty(starts[-1], dtype=np.int32) if out is None else out[:starts[-1]]
    for part, start, n in zip(parts, starts, sizes):
        packed[start:start + n] = part.reshape(-1)
    return packed, starts[:-1], sizes


def _interpreted(device: torch.device) -> bool:
    """Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1): tests and CI."""
    return device.type == "cpu"


class TritonPagedAttentionBackend(AttentionBackend):
    """Paged attention in Triton: GQA-aware, split-KV decode, mixed prefill/decode batches."""
    name = "triton_paged"
    supported_dtypes = ("bfloat16", "float16", "float32")
    supported_head_sizes = (16, 32, 64, 96, 128, 256)
    supported_block_sizes = (8, 16, 32, 64, 128)
    launch = TritonLaunchConfig()

    def __init__(self, spec: AttentionSpec):
        super().__init__(spec)
        self.block_d = max(16, triton_next_pow2(spec.head_size))
        self.block_h = max(16, triton_next_pow2(spec.num_queries_per_kv))
        G = spec.num_queries_per_kv
        self.block_m = max(self.launch.prefill_block_m, triton_next_pow2(G))
        self.block_q = self.block_m // G                # query tokens per prefill tile
        self._sm_count: dict[torch.device, int] = {}
        # KV heads the split-KV choice counts: this rank's by default. tp_invariant sets the
        # model's total, so every tensor-parallel size splits a context alike (the splits'
        # partial results are combined in float32, so another split is other bits).
        self.split_kv_heads = spec.num_kv_heads

    @classmethod
    def validate_spec(cls, spec: AttentionSpec) -> None:
        super().validate_spec(spec)
        if spec.sliding_window is not None and spec.sliding_window < 1:
            raise UnsupportedAttentionConfig(
                f"sliding_window must be >= 1, got {spec.sliding_window}")

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                       head_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    # Once per step ---------------------------------------------------------------------
    def build_metadata(self, common: CommonAttentionMetadata, device) -> TritonPagedMetadata:
        device = torch.device(device)
        qsl = common.query_start_loc.astype(np.int64)
        query_lens = qsl[1:] - qsl[:-1]
        num_reqs, num_tokens = common.num_reqs, common.num_tokens
        table = common.block_table
        decode_only = num_reqs > 0 and num_tokens == num_reqs
        parts = [common.slot_mapping.astype(np.int32), common.seq_lens.astype(np.int32),
                 table.astype(np.int32).reshape(-1)]
        if not decode_only:
            parts += [qsl.astype(np.int32), *self.prefill_tiles(query_lens)]
        views = pack_int32(parts, device)
        metadata = TritonPagedMetadata(slot_mapping=views[0], seq_lens=views[1],
                                       block_table=views[2].view(table.shape),
                                       decode_only=decode_only)
        if decode_only:
            metadata.num_splits = self.num_splits(num_reqs, common.max_seq_len, device)
        else:
            metadata.query_start_loc, metadata.tile_req, metadata.tile_q0 = views[3:]
        return metadata

    def prefill_tiles(self, query_lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(request, first query token) int32 of every tile of the unified kernel's grid."""
        n_tiles = -(-query_lens.astype(np.int64) // self.block_q)
        tile_req = np.repeat(np.arange(query_lens.size, dtype=np.int32), n_tiles)
        first = np.repeat(np.cumsum(n_tiles) - n_tiles, n_tiles)
        tile_q0 = ((np.arange(tile_req.size) - first) * self.block_q).astype(np.int32)
        return tile_req, tile_q0

    def decode_metadata(self, slot_mapping: torch.Tensor, seq_lens: torch.Tensor,
                        block_table: torch.Tensor, num_splits: int) -> TritonPagedMetadata:
        """Decode metadata over device tensors the caller owns (CUDA graph buffers):
        slot_mapping and seq_lens [batch] int32, block_table [batch, max_blocks] int32.
        Padding rows have slot -1 and seq_len 0."""
        if num_splits < 1 or num_splits & (num_splits - 1):
            raise ValueError(f"num_splits must be a power of two, got {num_splits}")
        return TritonPagedMetadata(slot_mapping=slot_mapping, seq_lens=seq_lens,
                                   block_table=block_table, decode_only=True,
                                   num_splits=num_splits)

    def num_splits(self, num_reqs: int, max_seq_len: int, device: torch.device) -> int:
        """Split-KV factor of a decode batch: a power of two that brings the grid to about
        `decode_programs_per_sm` programs per SM, with splits of `min_split_tokens` or more."""
        launch = self.launch
        programs = max(num_reqs * self.split_kv_heads, 1)
        wanted = -(-launch.decode_programs_per_sm * self.sm_count(device) // programs)
        by_length = max(max_seq_len // launch.min_split_tokens, 1)
        splits = max(1, min(wanted, by_length, launch.max_splits))
        return 1 << (splits.bit_length() - 1)              # round down to a power of two

    def sm_count(self, device: torch.device) -> int:
        if device not in self._sm_count:
            if device.type == "cpu":
                self._sm_count[device] = 4
            else:
                self._sm_count[device] = torch.cuda.get_device_properties(device).multi_processor_count
        return self._sm_count[device]

    # Per layer -------------------------------------------------------------------------
    def forward(self, query, key, value, kv_cache, metadata: TritonPagedMetadata):
        spec = self.spec
        T = query.shape[0]
        out = _empty((T, spec.num_heads * spec.head_size), query.dtype, query.device)
        if T == 0:
            return out
        self.write_kv(key, value, kv_cache, metadata.slot_mapping)
        if metadata.decode_only:
            self.decode(query, kv_cache, metadata, out)
        else:
            self.prefill(query, kv_cache, metadata, out)
        return out

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        """Scatter [T, kvh, D] keys and values into their slots (slot < 0: skipped)."""
        spec = self.spec
        row = spec.num_kv_heads * spec.head_size
        key = key if key[0].is_contiguous() else key.contiguous()
        value = value if value[0].is_contiguous() else value.contiguous()
        K.write_kv_kernel[(key.shape[0],)](
            key, value, kv_cache[0], kv_cache[1], slot_mapping, key.stride(0), value.stride(0),
            ROW=row, BLOCK=triton_next_pow2(row), num_warps=4 if row >= 512 else 1)

    def _common_args(self, query, kv_cache, out):
        spec = self.spec
        q = query.view(query.shape[0], spec.num_heads, spec.head_size)
        k_cache = kv_cache[0]
        args = dict(stride_qt=q.stride(0), stride_qh=q.stride(1),
                    stride_ot=out.stride(0), stride_oh=spec.head_size,
                    stride_kb=k_cache.stride(0), stride_ks=k_cache.stride(1),
                    stride_kh=k_cache.stride(2))
        consts = dict(G=spec.num_queries_per_kv, D=spec.head_size, BLOCK_D=self.block_d,
                      BLOCK_SIZE=spec.block_size, HAS_WINDOW=spec.sliding_window is not None,
                      DOT_MODE=self._dot_mode(kv_cache))
        return q, args, consts

    def _dot_mode(self, kv_cache: torch.Tensor) -> int:
        if _interpreted(kv_cache.device):
            return 2
        return 1 if kv_cache.dtype == torch.float32 else 0

    def decode(self, query, kv_cache, md: TritonPagedMetadata, out) -> None:
        spec, launch = self.spec, self.launch
        q, args, consts = self._common_args(query, kv_cache, out)
        num_reqs, splits = md.seq_lens.shape[0], md.num_splits
        part_out = part_lse = out                     # unused with one split
        if splits > 1:
            part_out = _empty((num_reqs, spec.num_heads, splits, self.block_d),
                              torch.float32, query.device)
            part_lse = _empty((num_reqs, spec.num_heads, splits), torch.float32, query.device)
        K.paged_decode_kernel[(num_reqs, spec.num_kv_heads, splits)](
            out, part_out, part_lse, q, kv_cache[0], kv_cache[1], md.block_table, md.seq_lens,
            spec.scale * LOG2E, spec.sliding_window or 0, stride_bt=md.block_table.stride(0),
            BLOCK_H=self.block_h, BLOCK_N=launch.block_n(spec.head_size, decode=True),
            NUM_SPLITS=splits, num_warps=launch.warps(spec.head_size, decode=True),
            num_stages=launch.decode_stages,
            **args, **consts)
        if splits > 1:
            K.decode_reduce_kernel[(num_reqs, spec.num_heads)](
                out, part_out, part_lse, out.stride(0), spec.head_size, D=spec.head_size,
                BLOCK_D=self.block_d, NUM_SPLITS=splits, num_warps=1 if self.block_d <= 64 else 2)

    def prefill(self, query, kv_cache, md: TritonPagedMetadata, out) -> None:
        spec, launch = self.spec, self.launch
        q, args, consts = self._common_args(query, kv_cache, out)
        K.paged_attention_kernel[(md.tile_req.shape[0], spec.num_kv_heads)](
            out, q, kv_cache[0], kv_cache[1], md.block_table, md.seq_lens, md.query_start_loc,
            md.tile_req, md.tile_q0, spec.scale * LOG2E, spec.sliding_window or 0,
            stride_bt=md.block_table.stride(0), BLOCK_M=self.block_m, BLOCK_Q=self.block_q,
            BLOCK_N=launch.block_n(spec.head_size, decode=False),
            num_warps=launch.warps(spec.head_size, decode=False),
            num_stages=launch.prefill_stages, **args, **consts)


def triton_next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()

