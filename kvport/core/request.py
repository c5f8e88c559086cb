"""A request's life inside the engine, and the outputs handed back to callers.

vLLM v1's model: no prefill or decode phase, only `num_computed_tokens` against `num_tokens`.
One user request with n > 1 becomes n engine requests ("samples") that share one prompt.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from kvport.core.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass
class Logprob:
    """Log-probability of one token, its rank in the distribution and its text."""
    logprob: float
    rank: int
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob (the sampled token plus the top-k).
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class Request:
    """One sample of one user request, as the scheduler and KV cache manager see it."""
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    sample_index: int = 0
    # The sample that computes the shared prompt; the others wait and then share its blocks.
    prompt_leader: "Request | None" = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Sampled in a launched step but not received yet (async scheduling only; 0 or 1 once
    # outputs are processed, at most 2 while a step is in flight).
    num_pending_tokens: int = 0
    num_cached_tokens: int = -1  # prompt tokens found in the prefix cache at first scheduling
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    first_token_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def prompt_computed(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None


@dataclass
class CompletionOutput:
    """One of the n completions of a request (vLLM's shape)."""
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """Everything produced so far for one user request; `finished` once all n samples are."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0


@dataclass
class CompletionDelta:
    """What one sample produced since the previous delta (for streaming)."""
    index: int
    text: str
    token_ids: list[int]
    logprobs: SampleLogprobs | None
    cumulative_logprob: float | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestDelta:
    """One step's news for one user request: only the samples that moved."""
    request_id: str
    deltas: list[CompletionDelta]
    finished: bool
    num_prompt_tokens: int
    num_cached_tokens: int
