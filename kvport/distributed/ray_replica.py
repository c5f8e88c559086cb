"""Engine replicas as Ray actors: joining or starting Ray, and the API side of one replica.

`RayReplicaClient` is an AsyncLLMEngine whose engine core runs in a Ray actor
(ray_actor.EngineCoreHost) instead of a local process: the same messages, carried by
`RayConnection` (actor calls) instead of a pipe. A replica counts as failed when its actor
dies (Ray raises RayActorError on the next call) or when it does not answer a health check
in time (then it is killed, so that its requests fail over instead of hanging).

This is the one module of kvport that imports Ray.
"""
from __future__ import annotations

import logging
import threading
import uuid
from collections import deque

from kvport.core.async_engine import AsyncLLMEngine, EngineStartupError
from kvport.core.config import EngineConfig
from kvport.core.engine_client import ReplicaStatus
from kvport.distributed.ray_actor import EngineCoreHost
from kvport.distributed.ray_support import import_ray

ray = import_ray()
from ray.exceptions import GetTimeoutError, RayActorError  # noqa: E402 (after the check)

logger = logging.getLogger(__name__)

NAMESPACE = "kvport"
# kvport moves only requests and step results through Ray (kilobytes), so a Ray instance it
# starts itself gets a small object store instead of Ray's default of ~30% of memory.
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20
# How long one fetch waits for step results in the actor before returning empty-handed.
FETCH_WAIT_S = 5.0
# submit and fetch each get their own actor thread (so a waiting fetch never delays a
# submit); ping and wait_stopped share a third, so health checks are answered mid-step.
CONCURRENCY_GROUPS = {"submit": 1, "fetch": 1, "control": 2}
RemoteEngineCoreHost = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(EngineCoreHost)


class RayConnection:
    """The API side's connection to an EngineCoreHost actor, with a pipe's send / recv / poll.

    send blocks until the actor has the message, so messages reach the core in order. Once
    the actor is gone, send raises BrokenPipeError and recv EOFError, as a pipe would.
    """

    def __init__(self, actor):
        self._actor = actor
        self._received: deque = deque()
        self.failure: str | None = None   # why the connection ended
        self.ended = False

    def send(self, message) -> None:
        if self.ended:
            raise BrokenPipeError(self.failure or "the replica has stopped")
        try:
            ray.get(self._actor.submit.options(concurrency_group="submit").remote([message]))
        except RayActorError as exc:
            self._end(exc)
            raise BrokenPipeError(self.failure) from exc

    def recv(self):
        while not self._received:
            if self.ended:
                raise EOFError(self.failure or "the replica has stopped")
            self._fetch(FETCH_WAIT_S)
        return self._received.popleft()

    def poll(self, timeout: float | None = 0.0) -> bool:
        if not self._received and not self.ended:
            if timeout is None:
                while not self._received and not self.ended:
                    self._fetch(FETCH_WAIT_S)
            else:
                self._fetch(timeout)
        return bool(self._received) or self.ended

    def _fetch(self, wait: float) -> None:
        try:
            messages, core_exited = ray.get(
                self._actor.fetch.options(concurrency_group="fetch").remote(wait))
        except RayActorError as exc:
            self._end(exc)
            return
        self._received.extend(messages)
        if core_exited:
            self._end(None)

    def _end(self, error: BaseException | None) -> None:
        self.ended = True
        if error is not None and self.failure is None:
            self.failure = f"its Ray actor died: {_first_line(error)}"


class RayActorProcess:
    """An engine-core actor seen as AsyncLLMEngine sees its core process: is_alive, join,
    kill, exitcode. Joining a stopped core also ends the actor, releasing its resources."""

    def __init__(self, actor, connection: RayConnection):
        self.actor = actor
        self.connection = connection
        self.killed_because: str | None = None
        self.exitcode = None   # actors have none; RayReplicaClient says why instead

    def is_alive(self) -> bool:
        return self.killed_because is None and not self.connection.ended

    def join(self, timeout: float | None = None) -> None:
        wait = 5.0 if timeout is None else timeout
        try:
            stopped = ray.get(self.actor.wait_stopped.options(concurrency_group="control")
                              .remote(wait), timeout=wait + 5.0)
        except (RayActorError, GetTimeoutError):
            stopped = False
        if stopped:
            self.kill("it was shut down")

    def kill(self, reason: str = "killed by the server") -> None:
        self.killed_because = self.killed_because or reason
        ray.kill(self.actor, no_restart=True)


class RayReplicaClient(AsyncLLMEngine):
    """One replica: an AsyncLLMEngine whose engine core is a Ray actor, health-checked."""

    def __init__(self, config: EngineConfig, index: int, actor_name: str):
        super().__init__(config)
        self.index = index
        self.actor_name = actor_name
        self.node = ""
        self._stopping = threading.Event()

    def _launch(self):
        parallel = self.config.parallel
        actor = RemoteEngineCoreHost.options(
            name=self.actor_name, namespace=NAMESPACE, max_restarts=0, max_task_retries=0,
            num_cpus=replica_cpus(self.config),
            num_gpus=parallel.ray_gpus_per_replica).remote(self.config)
        connection = RayConnection(actor)
        return RayActorProcess(actor, connection), connection

    def _exit_description(self) -> str:
        process = self._process
        if process is None:
            return f"replica {self.index} is not running"
        why = (process.killed_because or process.connection.failure
               or "its engine core exited")
        return f"replica {self.index} ({self.actor_name}): {why}"

    def start(self, startup_timeout: float | None = None):
        info = super().start(startup_timeout)
        actor = self._process.actor
        self.node = ray.get(actor.node_name.options(concurrency_group="control").remote())
        threading.Thread(target=self._check_health, name=f"kvport-replica-{self.index}-health",
                         daemon=True).start()
        return info

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        super().shutdown(timeout)

    def replica_status(self) -> list[ReplicaStatus]:
        status = super().replica_status()[0]
        status.index, status.node = self.index, self.node
        return [status]

    def _check_health(self) -> None:
        """Ping the actor every interval; one that does not answer in time is killed, which
        ends its connection, so its requests fail over instead of waiting forever."""
        parallel = self.config.parallel
        while not self._stopping.wait(parallel.replica_health_check_interval):
            process = self._process
            if process is None or not process.is_alive():
                return
            try:
                ray.get(process.actor.ping.options(concurrency_group="control").remote(),
                        timeout=parallel.replica_health_check_timeout)
            except GetTimeoutError:
                reason = (f"it did not answer a health check within "
                          f"{parallel.replica_health_check_timeout:g} s")
                logger.error("replica %d: %s; removing it", self.index, reason)
                process.kill(reason)
                return
            except RayActorError:
                return   # the connection sees the death too, and reports it


def replica_cpus(config: EngineConfig) -> int:
    """CPUs Ray reserves for one replica: its engine's thread count where set, else 1."""
    return config.device.num_threads or 1


class RayReplicaLauncher:
    """Joins (or starts) Ray, checks it can hold the replicas, and makes their clients."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.run_id = uuid.uuid4().hex[:8]   # several servers may share one cluster

    def open(self) -> None:
        """Join `ray_address`, or start a private local Ray; refuse what cannot fit."""
        address = self.config.parallel.ray_address
        if not ray.is_initialized():
            try:
                if address:
                    ray.init(address=address, namespace=NAMESPACE)
                else:
                    ray.init(namespace=NAMESPACE, include_dashboard=False,
                             object_store_memory=LOCAL_OBJECT_STORE_BYTES)
            except Exception as exc:   # Ray's errors vary by cause; all end start-up
                where = f"join the Ray cluster at {address!r}" if address else "start Ray"
                raise EngineStartupError(f"could not {where}: {type(exc).__name__}: "
                                         f"{exc}") from exc
        self._check_resources()

    def _check_resources(self) -> None:
        parallel, total = self.config.parallel, ray.cluster_resources()
        wanted = {"CPU": replica_cpus(self.config), "GPU": parallel.ray_gpus_per_replica}
        for resource, each in wanted.items():
            need = each * parallel.data_parallel_size
            if need > total.get(resource, 0):
                raise EngineStartupError(
                    f"{parallel.data_parallel_size} replicas need {need:g} {resource}s of the "
                    f"Ray cluster ({each:g} each), which has {total.get(resource, 0):g}")

    def replica(self, index: int) -> RayReplicaClient:
        """The (unstarted) client of replica `index`."""
        return RayReplicaClient(self.config, index, f"kvport-{self.run_id}-replica-{index}")

    def close(self) -> None:
        """Leave Ray (which stops the local instance, if this process started it)."""
        if ray.is_initialized():
            ray.shutdown()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
