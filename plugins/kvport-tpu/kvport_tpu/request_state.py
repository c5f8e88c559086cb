"""What the JAX worker remembers about each request between steps: the shared record as is
(its sampling seed feeds the JAX sampler's keys)."""
from __future__ import annotations

from kvport.core.worker_state import WorkerRequestState as RequestState  # noqa: F401
