"""The CUDA model runner: the shared torch runner with the host work of a step cut down.

What differs from `TorchModelRunner` (whose request bookkeeping and sampler it reuses):

* block tables live on the GPU across steps (`DeviceBlockTables`); a step sends only new
  block ids and its requests' row numbers;
* a step's other integer inputs go to the GPU in one asynchronous copy from pinned memory;
* pure-decode steps replay a captured CUDA graph (`DecodeGraphs`) instead of launching the
  model's kernels one by one; other steps (prefill chunks, mixed batches, batches larger than
  the largest graph, or `enforce_eager`) run eagerly through the same Triton kernels;
* sampling stays on the GPU (the shared sampler); only the sampled ids come back, copied
  in the background: with async scheduling the engine launches the next step first, and
  that step takes its input tokens from the sampled ids on the GPU (`pending`).

It needs the `triton_paged` backend's kernels (they take device-resident metadata); with any
other attention backend the worker uses the shared runner instead.
"""
from __future__ import annotations

import numpy as np
import torch

from kvport.attention_backends.triton_paged import TritonPagedMetadata
from kvport.core.worker import (CompletedOutput, ModelRunnerOutput, PendingOutput,
                                SchedulerOutput)
from kvport.core.worker_state import scheduled_states
from kvport.models.tp_group import SINGLE_GROUP, TensorParallelGroup
from kvport.torch_worker.model_runner import TorchModelRunner
from kvport.torch_worker.pending import patch_pending_inputs, pending_sources
from kvport_cuda.block_tables import DeviceBlockTables
from kvport_cuda.graphs import DecodeGraphs
from kvport_cuda.host_batch import HostBatch, build_host_batch
from kvport_cuda.staging import HostStaging


class CudaModelRunner(TorchModelRunner):
    """Device-resident step inputs, CUDA-graph decode, GPU sampling."""

    def __init__(self, model, attn_backend, kv_caches: list[torch.Tensor],
                 device: torch.device, block_size: int, vocab_size: int, *,
                 max_num_seqs: int, max_model_len: int,
                 tp: TensorParallelGroup = SINGLE_GROUP):
        super().__init__(model, attn_backend, kv_caches, device, block_size, vocab_size, tp=tp)
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.tables = DeviceBlockTables(max_num_seqs, self.max_blocks, device)
        self.staging = HostStaging(device, torch.int32)
        self.patch_staging = HostStaging(device, torch.int32)
        self.index_staging = HostStaging(device, torch.int32)
        self.graphs: DecodeGraphs | None = None

    def capture_graphs(self, batch_sizes: list[int]) -> None:
        """Capture the decode graphs; afterwards decode steps of up to max(batch_sizes)
        requests replay them."""
        graphs = DecodeGraphs(self.model, self.attn_backend, self.kv_caches, self.device,
                              self.max_blocks, self.max_model_len, batch_sizes)
        graphs.capture()
        self.graphs = graphs

    def update_states(self, scheduler_output: SchedulerOutput) -> None:
        super().update_states(scheduler_output)
        for req_id in scheduler_output.freed_req_ids:
            self.tables.remove(req_id)
        for new in scheduler_output.new_requests:
            self.tables.remove(new.req_id)        # a resumed request starts a fresh row
            self.tables.add(new.req_id, self.states[new.req_id].block_ids)
        for cached in scheduler_output.cached_requests:
            self.tables.extend(cached.req_id, self.states[cached.req_id].block_ids)
        self.tables.flush()

    @torch.inference_mode()
    def execute_async(self, scheduler_output: SchedulerOutput) -> PendingOutput:
        """Launch the step and return without waiting for the GPU: nothing here copies from
        the device or from pageable host memory (either would wait for the stream)."""
        self.update_states(scheduler_output)
        if scheduler_output.is_empty:
            return CompletedOutput(ModelRunnerOutput())
        req_ids, states, counts = scheduled_states(self.states, scheduler_output)
        batch = build_host_batch(states, counts, self.block_size)
        patch = self._pending_patch(batch, req_ids)
        if batch.decode_only and self.graphs is not None and self.graphs.bucket(len(states)):
            hidden = self.graphs.run(batch, req_ids, self.tables, patch)
            logits_indices = None
            if len(batch.sampling_rows) < len(states):   # a prompt's one-token chunk
                logits_indices = self.index_staging.to_device(
                    batch.logits_indices.astype(np.int32)).long()
        else:
            hidden, logits_indices = self._forward_eager(batch, req_ids, patch)
        for state, count in zip(states, counts):
            state.num_computed_tokens += count
        if not batch.sampling_rows:
            return CompletedOutput(ModelRunnerOutput())
        if len(batch.sampling_rows) < hidden.shape[0]:
            hidden = hidden[logits_indices]     # only the rows that sample (prefill ends)
        return self.sample(self.model.compute_logits(hidden),
                           [req_ids[i] for i in batch.sampling_rows])

    def _pending_patch(self, batch: HostBatch, req_ids: list[str]):
        """A function writing the previous step's sampled ids into this step's placeholder
        inputs on the device (None when every input is known on the host)."""
        qsl = None
        if not batch.decode_only:
            qsl = np.zeros(batch.num_reqs + 1, dtype=np.int64)
            np.cumsum(batch.query_lens, out=qsl[1:])
        sources = pending_sources(batch.input_ids, qsl, req_ids, self.previous)
        if sources is None:
            return None
        holes, rows = sources
        packed = self.patch_staging.to_device(np.concatenate([holes, rows]).astype(np.int32))
        k = holes.size
        previous = self.previous

        def patch(input_ids: torch.Tensor) -> None:
            patch_pending_inputs(input_ids, packed[:k].long(), packed[k:].long(), previous)
        return patch

    def _forward_eager(self, batch: HostBatch, req_ids: list[str], patch=None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every integer input in one copy, the block table gathered on the GPU, then the
        model's kernels launched one by one. Returns the hidden states and, on the device,
        the index of each sampling row's last token."""
        parts = [batch.input_ids, batch.positions, batch.slot_mapping, batch.seq_lens,
                 np.fromiter((self.tables.rows[r] for r in req_ids), np.int32, len(req_ids)),
                 batch.logits_indices.astype(np.int32)]
        if not batch.decode_only:
            qsl = np.zeros(batch.num_reqs + 1, dtype=np.int32)
            np.cumsum(batch.query_lens, out=qsl[1:])
            parts += [qsl, *self.attn_backend.prefill_tiles(batch.query_lens)]
        views = self.staging.parts_to_device(parts)
        ids, positions, slots, seq_lens, rows, logits_indices = views[:6]
        if patch is not None:
            patch(ids)
        table = self.tables.gather(req_ids, rows_device=rows)
        metadata = TritonPagedMetadata(slot_mapping=slots, seq_lens=seq_lens, block_table=table,
                                       decode_only=batch.decode_only)
        if batch.decode_only:
            metadata.num_splits = self.attn_backend.num_splits(
                batch.num_reqs, int(batch.seq_lens.max()), self.device)
        else:
            metadata.query_start_loc, metadata.tile_req, metadata.tile_q0 = views[6:]
        hidden = self.model(ids, positions, self.kv_caches, metadata)
        return hidden, logits_indices.long()
