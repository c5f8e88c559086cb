"""Async scheduling in the torch workers: sampled ids that stay on the device for a step.

When the engine schedules step N+1 before it has seen step N's tokens, each request that
sampled in step N has, as its next input, a token only the device knows. The runner records
a placeholder in the request's host state and a `PendingSample` for the step; step N+1's
input ids get the real values on the device (`patch_pending_inputs`), and the host learns them
when the engine calls `result()`, which also replaces the placeholders.
"""
from __future__ import annotations

import numpy as np
import torch

from kvport.core.worker import ModelRunnerOutput, PendingOutput, SampledLogprobs
from kvport.torch_worker.request_state import RequestState
from kvport.torch_worker.sampler import has_penalties

PLACEHOLDER = -1


class PendingSample(PendingOutput):
    """One step's sampled ids, copied to the host in the background."""

    def __init__(self, req_ids: list[str], states: list[RequestState], sampled: torch.Tensor,
                 logprobs: SampledLogprobs | None):
        self.req_ids = req_ids
        self.row_of = {req_id: row for row, req_id in enumerate(req_ids)}
        self.sampled = sampled
        self._logprobs = logprobs
        self._states = states
        self._slots = [len(s.output_token_ids) for s in states]
        for state in states:
            state.output_token_ids.append(PLACEHOLDER)
        self._event = None
        if sampled.device.type == "cuda":
            # Pinned memory and an event: the copy runs behind the step, and only result()
            # waits for it.
            self._host = torch.empty(sampled.shape, dtype=sampled.dtype, pin_memory=True)
            self._host.copy_(sampled, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = sampled
        self._output: ModelRunnerOutput | None = None

    @property
    def resolved(self) -> bool:
        return self._output is not None

    def result(self) -> ModelRunnerOutput:
        if self._output is None:
            if self._event is not None:
                self._event.synchronize()
            tokens = self._host.tolist()
            for state, slot, token in zip(self._states, self._slots, tokens):
                state.output_token_ids[slot] = token
            self._output = ModelRunnerOutput(req_ids=self.req_ids, sampled_token_ids=tokens,
                                             logprobs=self._logprobs)
            self._states = []
        return self._output


def pending_sources(input_ids: np.ndarray, query_start_loc: np.ndarray | None,
                    req_ids: list[str], previous: PendingSample | None
                    ) -> tuple[np.ndarray, np.ndarray] | None:
    """Where this step's inputs are placeholders, and which row of the previous step's sampled
    ids fills each: (positions, rows), or None when every input is known.

    `query_start_loc` maps positions to requests; None means one token per request.
    """
    holes = np.flatnonzero(input_ids == PLACEHOLDER)
    if holes.size == 0:
        return None
    owners = holes if query_start_loc is None else \
        np.searchsorted(query_start_loc, holes, side="right") - 1
    if previous is None or previous.resolved:
        raise RuntimeError("internal error: an input token is pending but no step is in "
                           "flight to supply it")
    try:
        rows = np.fromiter((previous.row_of[req_ids[o]] for o in owners), np.int64, holes.size)
    except KeyError as exc:
        raise RuntimeError(f"internal error: request {exc} has a pending input token that the "
                           "previous step did not sample") from None
    return holes, rows


def patch_pending_inputs(input_ids: torch.Tensor, holes: torch.Tensor, rows: torch.Tensor,
                         previous: PendingSample) -> None:
    """Write the previous step's sampled ids into the placeholder positions, on the device."""
    input_ids.index_copy_(0, holes, previous.sampled.index_select(0, rows).to(input_ids.dtype))


def needs_known_outputs(states: list[RequestState]) -> bool:
    """Whether sampling this batch reads output ids on the host (penalties: the sampler then
    counts every row's output tokens) while one of them is still a placeholder."""
    if all(s.plain_greedy for s in states):
        return False
    return (any(has_penalties(s.sampling_params) for s in states)
            and any(s.output_token_ids[-1:] == [PLACEHOLDER] for s in states))
