"""The Worker interface and the plain data that crosses it.

Everything here is ints, lists, numpy arrays and SamplingParams: no torch, no jax. That is what
lets a JAX worker and a torch worker serve the same scheduler, and what lets a worker live in
another process later. The worker keeps its own per-request state (token ids, block table,
random generator) between steps; the scheduler sends only what changed.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field

import numpy as np

from kvport.core.config import EngineConfig
from kvport.core.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the worker has no state for: first scheduling, or resumption after preemption.

    `output_token_ids` is non-empty for a resumed request: those tokens are recomputed like the
    prompt, but penalties still treat them as generated tokens.
    """
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    sample_seed: int | None
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """A request the worker already holds: only its newly allocated blocks."""
    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    """One engine step. Batch order is the order of `num_scheduled_tokens`."""
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    # Requests whose worker state must be dropped (finished, aborted or preempted) since the
    # previous step. A preempted request comes back later as a NewRequestData.
    freed_req_ids: list[str] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


@dataclass
class SampledLogprobs:
    """Logprobs for the tokens sampled this step, one row per sampling request.

    token_ids[i, 0] is the sampled token and token_ids[i, 1:] the top-k; logprobs and ranks
    align with token_ids (rank is 1-based within the raw distribution).
    """
    token_ids: np.ndarray
    logprobs: np.ndarray
    ranks: np.ndarray


@dataclass
class ModelRunnerOutput:
    """What one step produced: a sampled token for every request that reached its end.

    Requests in the middle of a chunked prefill sample nothing and are absent from `req_ids`.
    `logprobs` rows align with `req_ids`; it is None when no request asked for logprobs
    (rows of requests that did not ask are present but ignored).
    """
    req_ids: list[str] = field(default_factory=list)
    sampled_token_ids: list[int] = field(default_factory=list)
    logprobs: SampledLogprobs | None = None


class PendingOutput(abc.ABC):
    """A launched step whose ModelRunnerOutput may not be on the host yet."""

    @abc.abstractmethod
    def result(self) -> ModelRunnerOutput:
        """Wait for the step and return its output (the same object on every call)."""


class CompletedOutput(PendingOutput):
    """A step that already finished: what a worker that cannot overlap steps returns."""

    def __init__(self, output: ModelRunnerOutput):
        self.output = output

    def result(self) -> ModelRunnerOutput:
        return self.output


class Worker(abc.ABC):
    """Runs the model on one device. The engine calls the methods in the order listed.

    Constructed by the engine as `WorkerClass(config, model_info, platform, registry)`: the
    validated config (dtype and max_model_len already resolved), the resolved model, the
    selected Platform, and the plugin registry (for model and attention backend classes).
    """

    def __init__(self, config: EngineConfig, model_info: "ModelInfo", platform=None,
                 registry=None):
        self.config = config
        self.model_info = model_info
        self.platform = platform
        self.registry = registry

    @abc.abstractmethod
    def init_device(self) -> None:
        """Bind to the device (threads, streams, default device); nothing heavy yet."""

    @abc.abstractmethod
    def load_model(self) -> None:
        """Build the model from `model_info` and load its weights onto the device."""

    @abc.abstractmethod
    def determine_available_kv_blocks(self) -> int:
        """How many KV blocks of `config.cache.block_size` tokens fit in the memory budget.

        Called after load_model, so the model's own memory is already accounted for.
        """

    @abc.abstractmethod
    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate the paged KV cache for every layer with exactly `num_blocks` blocks."""

    @abc.abstractmethod
    def warm_up(self) -> None:
        """Run whatever makes the first real step fast (graph capture, compilation)."""

    @abc.abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step: update request state, write KV, compute logits, sample.

        Must drop the state of `scheduler_output.freed_req_ids` first.
        """

    def prefers_async_scheduling(self) -> bool:
        """Whether `execute_model_async` returns before the device finishes, so overlapping
        the engine's host work with the device pays (the default for `async_scheduling`).
        Where the host computes the step itself there is nothing to overlap, and results one
        step late would only cost a wasted token per stopped request."""
        return False

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> PendingOutput:
        """Launch one step and return at once; the engine calls `result()` on it after
        launching the next step, so its host work overlaps the device's.

        Contract (async scheduling): the scheduler has already scheduled, as the next input
        token of each request sampling in the previous launched step, the token that step
        sampled, before the engine has seen it. The worker must feed that token from where it
        keeps it (device memory) and must have processed the previous step's output into its
        own request state by the time it is needed on the host (penalties, preemption). The
        default runs the step to completion, which satisfies this trivially.
        """
        return CompletedOutput(self.execute_model(scheduler_output))

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Free the device's resources; the worker is unusable afterwards."""


from kvport.core.model_info import ModelInfo  # noqa: E402  (cycle-free: type only)
