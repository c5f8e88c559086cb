"""DataParallelEngine: N engine replicas behind a router, served as one engine client.

Each replica is an engine client of its own (a RayReplicaClient: an engine core in a Ray
actor) made by a ReplicaLauncher. A request goes to the replica the Router picks. When a
replica fails (its actor died, or it stopped answering health checks), it is removed from
the router; its requests that have not yet produced a token move to another replica
transparently, and those that have fail with EngineInternalError (a 500, or an error event in
a stream that has started), because their output has already reached the client. With no
replica left, every request gets EngineDeadError (503).

Imports neither Ray nor torch.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Protocol

from kvport.core.async_engine import EngineDeadError, EngineInternalError, EngineStartupError
from kvport.core.config import EngineConfig
from kvport.core.engine import EngineSnapshot
from kvport.core.engine_client import ReplicaStatus
from kvport.core.request import RequestDelta
from kvport.core.sampling_params import SamplingParams
from kvport.distributed.router import NoReplicaError, Router

logger = logging.getLogger(__name__)


class ReplicaLauncher(Protocol):
    """Where replicas run (kvport.distributed.ray_replica.RayReplicaLauncher)."""

    def open(self) -> None:
        """Connect to (or start) what hosts the replicas; EngineStartupError if it cannot
        hold `data_parallel_size` of them."""

    def replica(self, index: int):
        """An unstarted engine client (AsyncLLMEngine interface) for replica `index`."""

    def close(self) -> None:
        """Disconnect, after every replica has been shut down."""


class DataParallelEngine:
    """Routes requests across replicas; see the module docstring for failures."""

    def __init__(self, config: EngineConfig, launcher: ReplicaLauncher):
        self.config = config
        self.launcher = launcher
        self.replicas: list = []
        self.router: Router | None = None
        self.info = None
        self._owners: dict[str, int] = {}   # request id -> the replica serving it
        self._rerouted: list[int] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self, startup_timeout: float | None = None):
        """Start every replica (in parallel) and wait until all have loaded the model."""
        count = self.config.parallel.data_parallel_size
        try:
            self.launcher.open()
        except BaseException:
            self.launcher.close()
            raise
        self.replicas = [self.launcher.replica(index) for index in range(count)]
        failures = _run_in_threads([lambda r=r: r.start(startup_timeout) for r in self.replicas])
        if any(failures):
            self.shutdown()
            raise EngineStartupError("; ".join(f"replica {index} could not start: {error}"
                                               for index, error in enumerate(failures) if error))
        self.info = self.replicas[0].info
        self.router = Router(count, self.info.block_size,
                             self.config.parallel.prefix_affinity_slack)
        self._rerouted = [0] * count
        return self.info

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver every replica's outputs to this event loop."""
        for replica in self.replicas:
            replica.attach_loop(loop)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every replica (in parallel), then leave the cluster."""
        replicas, self.replicas = self.replicas, []
        _run_in_threads([lambda r=r: r.shutdown(timeout) for r in replicas])
        self.launcher.close()

    @property
    def is_alive(self) -> bool:
        return any(replica.is_alive for replica in self.replicas)

    @property
    def dead_reason(self) -> str | None:
        if self.is_alive:
            return None
        if not self.replicas:
            return "the replicas are not running"
        return (f"all {len(self.replicas)} replicas have failed: "
                + "; ".join(r.dead_reason or "stopped" for r in self.replicas))

    @property
    def snapshot(self) -> EngineSnapshot:
        """All replicas' counters added up; gauges from the live ones only."""
        return combine_snapshots([(r.snapshot, r.info.num_blocks if r.info else 0, r.is_alive)
                                  for r in self.replicas])

    def replica_status(self) -> list[ReplicaStatus]:
        """Every replica, with what the router counts for it."""
        statuses = []
        for index, replica in enumerate(self.replicas):
            status = replica.replica_status()[0]
            status.index = index
            if self.router is not None:
                status.outstanding = self.router.outstanding[index]
                status.assigned = self.router.assigned[index]
                status.rerouted = self._rerouted[index]
            statuses.append(status)
        return statuses

    # ------------------------------------------------------------------- requests
    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestDelta]:
        """The request's deltas from the replica the router picks, moved to another replica
        if that one fails before the first delta (see the module docstring)."""
        while True:
            index = self._assign(prompt_token_ids)
            self._owners[request_id] = index
            streamed = False
            try:
                replica = self.replicas[index]
                async with aclosing(replica.generate(request_id, prompt_token_ids,
                                                     params)) as deltas:
                    async for delta in deltas:
                        streamed = True
                        yield delta
                return
            except EngineDeadError as exc:
                self._remove_failed()
                if streamed:
                    raise EngineInternalError(
                        f"{exc}, after this request had started streaming; output already "
                        "sent cannot move to another replica, retry the request") from exc
                self._rerouted[index] += 1
                logger.warning("request %s moves to another replica: %s", request_id, exc)
            finally:
                self._owners.pop(request_id, None)
                self.router.release(index)

    def abort(self, *request_ids: str) -> None:
        """Abort requests on the replicas serving them (unknown ids are ignored)."""
        for request_id in request_ids:
            index = self._owners.get(request_id)
            if index is not None and index < len(self.replicas):
                self.replicas[index].abort(request_id)

    def _assign(self, prompt_token_ids: list[int]) -> int:
        if self.router is None:
            raise EngineDeadError("the replicas are not running")
        self._remove_failed()
        try:
            return self.router.assign(prompt_token_ids)
        except NoReplicaError:
            raise EngineDeadError(self.dead_reason or "no replica is left") from None

    def _remove_failed(self) -> None:
        """Take replicas that have died out of the router (once each, loudly)."""
        for index, replica in enumerate(self.replicas):
            if self.router.healthy[index] and not replica.is_alive:
                self.router.remove(index)
                logger.error("removed replica %d: %s (%d of %d left)", index,
                             replica.dead_reason, self.router.num_healthy, len(self.replicas))


def combine_snapshots(parts: list[tuple[EngineSnapshot, int, bool]]) -> EngineSnapshot:
    """One snapshot from (snapshot, KV blocks, alive) per replica.

    Counters keep growing across a replica's failure (Prometheus counters must not go down),
    so every replica's last counters count; running/waiting and KV usage are the live ones'.
    KV usage is weighted by each replica's blocks: the fraction of all live blocks in use.
    """
    live = [(snap, blocks) for snap, blocks, alive in parts if alive]
    live_blocks = sum(blocks for _, blocks in live)
    return EngineSnapshot(
        num_running=sum(snap.num_running for snap, _ in live),
        num_waiting=sum(snap.num_waiting for snap, _ in live),
        kv_cache_usage=sum(snap.kv_cache_usage * blocks for snap, blocks in live) / live_blocks
        if live_blocks else 0.0,
        prefix_cache_queries=sum(snap.prefix_cache_queries for snap, _, _ in parts),
        prefix_cache_hits=sum(snap.prefix_cache_hits for snap, _, _ in parts),
        num_preemptions=sum(snap.num_preemptions for snap, _, _ in parts),
        num_prompt_tokens=sum(snap.num_prompt_tokens for snap, _, _ in parts),
        num_generation_tokens=sum(snap.num_generation_tokens for snap, _, _ in parts),
        num_steps=sum(snap.num_steps for snap, _, _ in parts))


def _run_in_threads(calls: list) -> list[BaseException | None]:
    """Run the calls concurrently; each one's exception (None where it succeeded)."""
    errors: list[BaseException | None] = [None] * len(calls)

    def run(index: int) -> None:
        try:
            calls[index]()
        except Exception as exc:   # reported to the caller, which decides
            errors[index] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors
