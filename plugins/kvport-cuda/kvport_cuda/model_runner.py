"""The CUDA model runner: the shared torch runner with the host work of a step cut down.

What differs from `TorchModelRunner` (whose request bookkeeping and sampler it reuses):

* block tables live on the GPU across steps (`DeviceBlockTables`); a step sends only new
  block ids and its requests' row numbers;
* a step's other integer inputs go to the GPU in one asynchronous copy from pinned memory;
* pure-decode steps replay a captured CUDA graph (`DecodeGraphs`) instead of launching the
  model's kernels one by one; other steps (prefill chunks, mixed batches, batches larger than
  the largest graph, or `enforce_eager`) run eagerly through the same Triton kernels;
* sampling stays on the GPU (the shared sampler); only the sampled ids come back.

It needs the `triton_paged` backend's kernels (they take device-resident metadata); with any
other attention backend the worker uses the shared runner instead.
"""
from __future__ import annotations

import numpy as np
import torch

from kvport.attention_backends.triton_paged import TritonPagedMetadata
from kvport.core.worker import ModelRunnerOutput, SchedulerOutput
from kvport.core.worker_state import scheduled_states
from kvport.models.tp_group import SINGLE_GROUP, TensorParallelGroup
from kvport.torch_worker.model_runner import TorchModelRunner
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
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self.update_states(scheduler_output)
        if scheduler_output.is_empty:
            return ModelRunnerOutput()
        req_ids, states, counts = scheduled_states(self.states, scheduler_output)
        batch = build_host_batch(states, counts, self.block_size)
        if batch.decode_only and self.graphs is not None and self.graphs.bucket(len(states)):
            hidden = self.graphs.run(batch, req_ids, self.tables)
        else:
            hidden = self._forward_eager(batch, req_ids)
        for state, count in zip(states, counts):
            state.num_computed_tokens += count
        if not batch.sampling_rows:
            return ModelRunnerOutput()
        return self._sample(hidden, batch, [req_ids[i] for i in batch.sampling_rows])

    def _forward_eager(self, batch: HostBatch, req_ids: list[str]) -> torch.Tensor:
        """Every integer input in one copy, the block table gathered on the GPU, then the
        model's kernels launched one by one."""
        parts = [batch.input_ids, batch.positions, batch.slot_mapping, batch.seq_lens,
                 np.fromiter((self.tables.rows[r] for r in req_ids), np.int32, len(req_ids))]
        if not batch.decode_only:
            qsl = np.zeros(batch.num_reqs + 1, dtype=np.int32)
            np.cumsum(batch.query_lens, out=qsl[1:])
            parts += [qsl, *self.attn_backend.prefill_tiles(batch.query_lens)]
        views = self.staging.parts_to_device(parts)
        ids, positions, slots, seq_lens, rows = views[:5]
        table = self.tables.gather(req_ids, rows_device=rows)
        metadata = TritonPagedMetadata(slot_mapping=slots, seq_lens=seq_lens, block_table=table,
                                       decode_only=batch.decode_only)
        if batch.decode_only:
            metadata.num_splits = self.attn_backend.num_splits(
                batch.num_reqs, int(batch.seq_lens.max()), self.device)
        else:
            metadata.query_start_loc, metadata.tile_req, metadata.tile_q0 = views[5:]
        return self.model(ids, positions, self.kv_caches, metadata)

    def _sample(self, hidden: torch.Tensor, batch: HostBatch,
                sampling_req_ids: list[str]) -> ModelRunnerOutput:
        if len(sampling_req_ids) == hidden.shape[0]:
            selected = hidden                      # every row samples (decode): no gather
        else:
            selected = hidden[torch.from_numpy(batch.logits_indices).to(self.device)]
        logits = self.model.compute_logits(selected)
        sampling_states = [self.states[r] for r in sampling_req_ids]
        token_ids, logprobs = self.sample_or_receive(logits, sampling_states)
        sampled = token_ids.tolist()
        for state, token_id in zip(sampling_states, sampled):
            state.output_token_ids.append(token_id)
        return ModelRunnerOutput(req_ids=sampling_req_ids, sampled_token_ids=sampled,
                                 logprobs=logprobs)
