"""What any worker remembers about each request between steps, framework-free.

The torch and JAX workers keep the same per-request record and update it the same way from
each SchedulerOutput; a framework adds only its own fields (a torch generator, caches).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

from kvport.core.sampling_params import SamplingParams
from kvport.core.worker import NewRequestData, SchedulerOutput


@dataclass
class WorkerRequestState:
    """One request as the worker holds it: its tokens, its blocks and its sampling seed.

    `output_token_ids` grows by one each time the worker samples for it, so penalties and the
    next step's input need nothing from the scheduler but the new block ids.
    """
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    seed: int | None = None

    @classmethod
    def from_new_request(cls, new: NewRequestData, **extra):
        """The state of a request the scheduler sends for the first time (or again, after a
        preemption); `extra` fills a subclass's own fields."""
        return cls(req_id=new.req_id, prompt_token_ids=list(new.prompt_token_ids),
                   output_token_ids=list(new.output_token_ids),
                   sampling_params=new.sampling_params, block_ids=list(new.block_ids),
                   num_computed_tokens=new.num_computed_tokens, seed=new.sample_seed,
                   **extra)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_at(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end) of prompt + output."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt:end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - num_prompt]


State = TypeVar("State", bound=WorkerRequestState)


def update_request_states(states: dict[str, State], scheduler_output: SchedulerOutput,
                          new_state: Callable[[NewRequestData], State]) -> None:
    """Drop freed requests, add new ones (built by `new_state`), extend the block tables and
    computed counts of the others."""
    for req_id in scheduler_output.freed_req_ids:
        states.pop(req_id, None)
    for new in scheduler_output.new_requests:
        states[new.req_id] = new_state(new)
    for cached in scheduler_output.cached_requests:
        state = states[cached.req_id]
        state.block_ids.extend(cached.new_block_ids)
        state.num_computed_tokens = cached.num_computed_tokens


def scheduled_states(states: dict[str, State], scheduler_output: SchedulerOutput
                     ) -> tuple[list[str], list[State], list[int]]:
    """The step's requests in scheduling order: their ids, states and scheduled token counts."""
    req_ids = list(scheduler_output.num_scheduled_tokens)
    counts = [scheduler_output.num_scheduled_tokens[r] for r in req_ids]
    return req_ids, [states[r] for r in req_ids], counts
