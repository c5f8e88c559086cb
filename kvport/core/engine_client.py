"""The engine client: what the API server holds, whether one engine or replicas behind a router.

`AsyncLLMEngine` (one engine core process) and `DataParallelEngine` (N replicas, each an
engine core in a local process or a Ray actor, behind kvport.distributed.router) both satisfy
`EngineClient`, so kvport/api serves either without knowing which. `build_engine_client`
picks one from the configuration.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from kvport.core.config import EngineConfig
    from kvport.core.engine import EngineSnapshot
    from kvport.core.engine_core import EngineInfo
    from kvport.core.request import RequestDelta
    from kvport.core.sampling_params import SamplingParams


@dataclass
class ReplicaStatus:
    """One engine replica as /health and /metrics report it."""
    index: int
    alive: bool
    pid: int | None = None
    node: str = ""               # host name of the machine it runs on ("" : this one)
    outstanding: int = 0         # requests assigned to it that have not ended
    assigned: int = 0            # requests ever assigned to it (0 for a single engine)
    rerouted: int = 0            # requests moved to another replica after it failed
    reason: str | None = None    # why it is not alive


class EngineClient(Protocol):
    """An engine the API process drives from asyncio.

    `info` and `snapshot` are plain attributes read without awaiting: `info` is set by
    `start()`, `snapshot` follows the engine's steps (for /metrics).
    """
    info: EngineInfo | None
    snapshot: EngineSnapshot

    def start(self, startup_timeout: float | None = None) -> EngineInfo:
        """Start the engine(s) and block until the model is loaded; EngineStartupError if not."""

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver outputs to this event loop from now on (called from the serving loop)."""

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort everything and stop the engine(s), waiting up to `timeout` s for each."""

    @property
    def is_alive(self) -> bool:
        """Whether a request submitted now can be served."""

    @property
    def dead_reason(self) -> str | None:
        """Why the engine cannot serve (None while it can)."""

    def replica_status(self) -> list[ReplicaStatus]:
        """Every replica, in index order (one entry for a single engine)."""

    def generate(self, request_id: str, prompt_token_ids: list[int],
                 params: SamplingParams) -> AsyncIterator[RequestDelta]:
        """Yield the request's deltas until it finishes.

        Raises InvalidRequestError, EngineOverloadedError, EngineInternalError or
        EngineDeadError; closing the iterator early aborts the request.
        """

    def abort(self, *request_ids: str) -> None:
        """Abort requests (unknown ids are ignored)."""


def build_engine_client(config: EngineConfig) -> EngineClient:
    """One engine core process, or replicas behind a router (`data_parallel_size`, Ray).

    Raises EngineStartupError (RayUnavailableError) when Ray is asked for but not installed.
    """
    if config.parallel.distributed_executor == "ray":
        from kvport.distributed.data_parallel import DataParallelEngine
        from kvport.distributed.ray_support import import_ray
        import_ray()   # fail here, before anything starts, when Ray is missing
        from kvport.distributed.ray_replica import RayReplicaLauncher
        return DataParallelEngine(config, RayReplicaLauncher(config))
    from kvport.core.async_engine import AsyncLLMEngine
    return AsyncLLMEngine(config)
