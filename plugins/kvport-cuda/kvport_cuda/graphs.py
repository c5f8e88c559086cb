"""CUDA graphs of the model's forward for pure-decode steps.

A decode step of a 1B model is a few hundred small kernels; launched one by one from Python
they take longer than the GPU needs to run them. Captured once per batch size (bucket), a
step is one graph launch. The graph reads its inputs from persistent device buffers:

    ints  [5, max_batch] int32: token ids, positions, KV slots, context lengths, table rows
    table [max_batch, max_blocks] int32: block ids, gathered from the persistent block table

A step of B requests runs the smallest bucket >= B; rows B.. are padding (slot -1: no KV
write; context length 0: attends to nothing), so padding never touches the KV cache.
Buckets share one memory pool and are captured largest first, as PyTorch recommends.
"""
from __future__ import annotations

import bisect
import logging
import time

import numpy as np
import torch

from kvport_cuda.block_tables import DeviceBlockTables
from kvport_cuda.host_batch import HostBatch
from kvport_cuda.staging import HostStaging

logger = logging.getLogger(__name__)

IDS, POSITIONS, SLOTS, SEQ_LENS, ROWS = range(5)


def default_batch_sizes(max_num_seqs: int, limit: int = 512) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to max_num_seqs (at most `limit`)."""
    top = min(max_num_seqs, limit)
    sizes = [s for s in (1, 2, 4) if s <= top] + list(range(8, top + 1, 8))
    if top not in sizes:
        sizes.append(top)
    return sorted(sizes)


class DecodeGraphs:
    """One captured forward per bucket size, over shared persistent input buffers."""

    def __init__(self, model, attn_backend, kv_caches: list[torch.Tensor],
                 device: torch.device, max_blocks: int, max_model_len: int,
                 batch_sizes: list[int]):
        self.model, self.attn_backend, self.kv_caches = model, attn_backend, kv_caches
        self.device = device
        self.sizes = sorted(batch_sizes)
        self.max_batch = self.sizes[-1]
        self.max_model_len = max_model_len
        self.ints = torch.zeros(5, self.max_batch, dtype=torch.int32, device=device)
        self.table = torch.zeros(self.max_batch, max_blocks, dtype=torch.int32, device=device)
        self.host = np.zeros((5, self.max_batch), dtype=np.int32)
        self.staging = HostStaging(device, torch.int32, 5 * self.max_batch)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def bucket(self, batch: int) -> int | None:
        """The smallest captured size that holds `batch` requests, or None."""
        i = bisect.bisect_left(self.sizes, batch)
        return self.sizes[i] if i < len(self.sizes) and self.sizes[i] in self.graphs else None

    def _forward(self, size: int) -> torch.Tensor:
        metadata = self.attn_backend.decode_metadata(
            self.ints[SLOTS, :size], self.ints[SEQ_LENS, :size], self.table[:size],
            self.attn_backend.num_splits(size, self.max_model_len, self.device))
        return self.model(self.ints[IDS, :size], self.ints[POSITIONS, :size],
                          self.kv_caches, metadata)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        self._fill_padding(0)
        self.staging.to_device(self.host.reshape(-1), out=self.ints.view(-1))
        for size in reversed(self.sizes):
            self._forward(size)                 # compiles the kernels outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[size] = self._forward(size)
            self.pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(self.device)
        logger.info("captured %d decode CUDA graphs (batch 1..%d) in %.1f s",
                    len(self.graphs), self.max_batch, time.perf_counter() - start)

    def _fill_padding(self, batch: int) -> None:
        self.host[:, batch:] = 0
        self.host[SLOTS, batch:] = -1

    def run(self, batch: HostBatch, req_ids: list[str], tables: DeviceBlockTables,
            patch=None) -> torch.Tensor:
        """Replay the bucket for this decode batch; returns hidden states [B, hidden]
        (a view of the graph's output, valid until the next replay). `patch`, if given,
        rewrites the token ids on the device before the replay (pending inputs)."""
        n = batch.num_reqs
        size = self.bucket(n)
        host = self.host
        host[IDS, :n] = batch.input_ids
        host[POSITIONS, :n] = batch.positions
        host[SLOTS, :n] = batch.slot_mapping
        host[SEQ_LENS, :n] = batch.seq_lens
        host[ROWS, :n] = [tables.rows[r] for r in req_ids]
        self._fill_padding(n)
        self.staging.to_device(host.reshape(-1), out=self.ints.view(-1))
        if patch is not None:
            patch(self.ints[IDS, :n])
        tables.gather(req_ids, out=self.table[:size], rows_device=self.ints[ROWS, :size])
        self.graphs[size].replay()
        return self.outputs[size][:n]
