"""What the JAX worker remembers about each request between steps."""
from __future__ import annotations

from dataclasses import dataclass

from kvport.core.sampling_params import SamplingParams


@dataclass
class RequestState:
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
