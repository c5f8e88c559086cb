"""The torch model runner: request state, one forward pass per step, sampling.

Shared by every torch platform (CPU, CUDA, ROCm, MPS, ...); a plugin subclasses only what its
hardware needs.

Under tensor parallelism every rank runs the same steps on its slice of the model; the logits
reach rank 0 only, rank 0 samples, and the sampled ids are broadcast so that every rank's
request states (the next step's input tokens) stay identical.
"""
from __future__ import annotations

import torch

from kvport.core.worker import (CompletedOutput, ModelRunnerOutput, PendingOutput,
                                SchedulerOutput)
from kvport.core.worker_state import scheduled_states, update_request_states
from kvport.models.tp_group import SINGLE_GROUP, TensorParallelGroup
from kvport.torch_worker.input_batch import build_step_inputs
from kvport.torch_worker.pending import (PendingSample, needs_known_outputs,
                                         patch_pending_inputs, pending_sources)
from kvport.torch_worker.request_state import RequestState
from kvport.torch_worker.sampler import Sampler, SamplingMetadata, is_plain_greedy


class TorchModelRunner:
    """Holds the model, its KV caches and every request's state on one torch device."""

    def __init__(self, model: torch.nn.Module, attn_backend, kv_caches: list[torch.Tensor],
                 device: torch.device, block_size: int, vocab_size: int,
                 tp: TensorParallelGroup = SINGLE_GROUP):
        self.model = model
        self.tp = tp
        self.attn_backend = attn_backend
        self.kv_caches = kv_caches
        self.device = device
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.sampler = Sampler()
        self.states: dict[str, RequestState] = {}
        self.previous: PendingSample | None = None     # the last step that sampled

    def update_states(self, scheduler_output: SchedulerOutput) -> None:
        """Drop freed requests, add new ones, extend block tables of the others."""
        update_request_states(self.states, scheduler_output, self._new_state)

    def _new_state(self, new) -> RequestState:
        return RequestState.from_new_request(new, generator=self._generator(new.sample_seed),
                                             plain_greedy=is_plain_greedy(new.sampling_params))

    def _generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(seed)

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step to completion."""
        return self.execute_async(scheduler_output).result()

    @torch.inference_mode()
    def execute_async(self, scheduler_output: SchedulerOutput) -> PendingOutput:
        """Run one step, leaving its sampled ids on the device (see `pending`)."""
        self.update_states(scheduler_output)
        if scheduler_output.is_empty:
            return CompletedOutput(ModelRunnerOutput())
        req_ids, states, counts = scheduled_states(self.states, scheduler_output)
        inputs = build_step_inputs(states, counts, self.block_size)
        attn_metadata = self.attn_backend.build_metadata(inputs.attention, self.device)
        input_ids = torch.from_numpy(inputs.input_ids).to(self.device)
        sources = pending_sources(inputs.input_ids, inputs.attention.query_start_loc, req_ids,
                                  self.previous)
        if sources is not None:
            holes, rows = (torch.from_numpy(a).to(self.device) for a in sources)
            patch_pending_inputs(input_ids, holes, rows, self.previous)
        hidden = self.model(input_ids, torch.from_numpy(inputs.positions).to(self.device),
                            self.kv_caches, attn_metadata)
        for state, count in zip(states, counts):
            state.num_computed_tokens += count
        if not inputs.sampling_req_ids:
            return CompletedOutput(ModelRunnerOutput())
        logits_indices = torch.from_numpy(inputs.logits_indices).to(self.device)
        logits = self.model.compute_logits(hidden[logits_indices])
        return self.sample(logits, inputs.sampling_req_ids)

    def sample(self, logits: torch.Tensor | None, sampling_req_ids: list[str]) -> PendingSample:
        """Sample one token per row; the ids stay on the device until `result()`.

        `logits` is None on tensor-parallel ranks other than 0: they receive rank 0's ids.
        """
        sampling_states = [self.states[r] for r in sampling_req_ids]
        if needs_known_outputs(sampling_states):
            self.previous.result()          # penalties count the pending tokens: wait for them
        token_ids, logprobs = self.sample_or_receive(logits, sampling_states)
        self.previous = PendingSample(sampling_req_ids, sampling_states, token_ids, logprobs)
        return self.previous

    def sample_or_receive(self, logits: torch.Tensor | None, sampling_states):
        """Sample one token per row; tensor-parallel ranks other than 0 (`logits` None)
        receive rank 0's ids instead."""
        if logits is None:
            token_ids = torch.empty(len(sampling_states), dtype=torch.int64, device=self.device)
            logprobs = None
        else:
            metadata = SamplingMetadata.from_states(sampling_states, self.vocab_size,
                                                    self.device)
            token_ids, logprobs = self.sampler(logits, metadata)
        self.tp.broadcast_from_first(token_ids)
        return token_ids, logprobs
