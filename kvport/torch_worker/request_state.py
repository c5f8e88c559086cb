"""What the torch worker remembers about each request between steps."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvport.core.worker_state import WorkerRequestState


@dataclass
class RequestState(WorkerRequestState):
    """The shared per-request record plus the torch worker's own: a seeded generator and
    whether sampling it is a plain argmax."""
    generator: torch.Generator | None = None
    # Sampling is one argmax (greedy, no penalties, min_tokens or logprobs): fixed for the
    # request's life, so steps check one flag per request instead of six parameters.
    plain_greedy: bool = False
