"""The torch model runner: request state, one forward pass per step, sampling.

Shared by every torch platform (CPU, CUDA, ROCm, MPS, ...); a plugin subclasses only what its
hardware needs.

Under tensor parallelism every rank runs the same steps on its slice of the model; the logits
reach rank 0 only, rank 0 samples, and the sampled ids are broadcast so that every rank's
request states (the next step's input tokens) stay identical.
"""
from __future__ import annotations

import torch

from kvport.core.worker import ModelRunnerOutput, SchedulerOutput
from kvport.core.worker_state import scheduled_states, update_request_states
from kvport.models.tp_group import SINGLE_GROUP, TensorParallelGroup
from kvport.torch_worker.input_batch import build_step_inputs
from kvport.torch_worker.request_state import RequestState
from kvport.torch_worker.sampler import Sampler, SamplingMetadata


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

    def update_states(self, scheduler_output: SchedulerOutput) -> None:
        """Drop freed requests, add new ones, extend block tables of the others."""
        update_request_states(self.states, scheduler_output, self._new_state)

    def _new_state(self, new) -> RequestState:
        return RequestState.from_new_request(new, generator=self._generator(new.sample_seed))

    def _generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(seed)

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self.update_states(scheduler_output)
        if scheduler_output.is_empty:
            return ModelRunnerOutput()
        req_ids, states, counts = scheduled_states(self.states, scheduler_output)
        inputs = build_step_inputs(states, counts, self.block_size)
        attn_metadata = self.attn_backend.build_metadata(inputs.attention, self.device)
        hidden = self.model(torch.from_numpy(inputs.input_ids).to(self.device),
                            torch.from_numpy(inputs.positions).to(self.device),
                            self.kv_caches, attn_metadata)
        for state, count in zip(states, counts):
            state.num_computed_tokens += count
        if not inputs.sampling_req_ids:
            return ModelRunnerOutput()
        logits_indices = torch.from_numpy(inputs.logits_indices).to(self.device)
        logits = self.model.compute_logits(hidden[logits_indices])
        sampling_states = [self.states[r] for r in inputs.sampling_req_ids]
        token_ids, logprobs = self.sample_or_receive(logits, sampling_states)
        sampled = token_ids.tolist()
        for state, token_id in zip(sampling_states, sampled):
            state.output_token_ids.append(token_id)
        return ModelRunnerOutput(req_ids=inputs.sampling_req_ids, sampled_token_ids=sampled,
                                 logprobs=logprobs)

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
