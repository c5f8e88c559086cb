"""AsyncLLMEngine: the API process's handle on an engine core running in its own process.

Nothing here blocks the event loop: a sender thread writes to the pipe (so a full pipe while
the core is mid-step never stalls HTTP), and a receiver thread reads the core's step results
and hands them to the loop in one call per step.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import queue
import threading
from collections.abc import AsyncIterator

from kvport.core.config import EngineConfig
from kvport.core.engine import EngineOverloadedError, EngineSnapshot
from kvport.core.engine_client import ReplicaStatus
from kvport.core.engine_core import (AbortRequest, AddRequest, EngineInfo, Ready,
                                     RequestFailed, Shutdown, StartupFailed, StepResult,
                                     run_engine_core)
from kvport.core.request import RequestDelta
from kvport.core.sampling_params import InvalidRequestError, SamplingParams

logger = logging.getLogger(__name__)


class EngineStartupError(RuntimeError):
    """The engine core process could not build the engine; the message says why."""


class EngineDeadError(RuntimeError):
    """The engine core process exited; requests in flight cannot complete."""


class EngineInternalError(RuntimeError):
    """The engine failed on one request because of a bug; the server keeps serving."""


_END = object()   # put on a request's queue after its last delta


class AsyncLLMEngine:
    """Start with `start()` (blocking, before serving), then `generate` / `abort` from asyncio."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.info: EngineInfo | None = None
        self.snapshot = EngineSnapshot()
        self.dead_reason: str | None = None
        self._process = None
        self._conn = None
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()
        self._shutting_down = False

    # ------------------------------------------------------------------ lifecycle
    def start(self, startup_timeout: float | None = None) -> EngineInfo:
        """Start the engine core and wait until its model is loaded."""
        self._process, self._conn = self._launch()
        parent = self._conn
        if not parent.poll(startup_timeout):
            self._process.kill()
            raise EngineStartupError(f"the engine did not start within {startup_timeout} s")
        try:
            message = parent.recv()
        except EOFError:
            raise EngineStartupError(f"{self._exit_description()} during start-up") from None
        if isinstance(message, StartupFailed):
            self._process.join(5)
            raise EngineStartupError("\n".join(filter(None, (message.message,
                                                              message.traceback))))
        assert isinstance(message, Ready)
        self.info = message.info
        threading.Thread(target=self._send_loop, name="kvport-engine-send", daemon=True).start()
        threading.Thread(target=self._receive_loop, name="kvport-engine-recv", daemon=True).start()
        return self.info

    def _launch(self):
        """Start the engine core; return (process, connection).

        The process is a multiprocessing.Process or anything with its is_alive(),
        join(timeout), kill() and exitcode; the connection carries engine_core's messages with
        a multiprocessing Connection's send / recv / poll (EOFError once the core is gone).
        Subclasses host the core elsewhere (kvport.distributed.ray_replica: a Ray actor).
        """
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe(duplex=True)
        # A daemonic process may not start processes, and a tensor-parallel engine starts one
        # per rank; those ranks end with the core (kvport/core/executor_process.py).
        daemonic = self.config.parallel.tensor_parallel_size == 1
        process = context.Process(target=run_engine_core, args=(self.config, child),
                                  name="kvport-engine-core", daemon=daemonic)
        process.start()
        child.close()
        return process, parent

    def _exit_description(self) -> str:
        """Why the engine core is gone, for error messages."""
        code = self._process.exitcode if self._process is not None else None
        return f"the engine process exited (code {code})"

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver outputs to this event loop from now on (call from the serving loop)."""
        self._loop = loop

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort everything, stop the core process, and wait for it (then kill it)."""
        if self._process is None:
            return
        self._shutting_down = True   # the core's exit from now on is no failure to report
        if self._process.is_alive():
            self._outbox.put(Shutdown())
            self._process.join(timeout)
        if self._process.is_alive():
            logger.warning("engine core did not stop within %.0f s; killing it", timeout)
            self._process.kill()
            self._process.join(5)
        self._outbox.put(None)
        self._process = None

    @property
    def is_alive(self) -> bool:
        return self.dead_reason is None and self._process is not None and self._process.is_alive()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def replica_status(self) -> list[ReplicaStatus]:
        """One entry: this engine is its only replica."""
        return [ReplicaStatus(index=0, alive=self.is_alive,
                              pid=self.info.pid if self.info else None,
                              outstanding=self.num_in_flight, reason=self.dead_reason)]

    # ------------------------------------------------------------------- requests
    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestDelta]:
        """Yield the request's deltas until it finishes.

        Raises InvalidRequestError (bad input), EngineOverloadedError (queue full),
        EngineInternalError or EngineDeadError. Cancelling the consumer (a client that went
        away) aborts the request in the engine, which frees its KV blocks.
        """
        if not self.is_alive:
            raise EngineDeadError(self.dead_reason or "the engine is not running")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._outbox.put(AddRequest(request_id, prompt_token_ids, params))
        finished = False
        try:
            while True:
                item = await stream.get()
                if item is _END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, *request_ids: str) -> None:
        """Abort requests (unknown ids are ignored by the engine)."""
        if request_ids and self.is_alive:
            self._outbox.put(AbortRequest(list(request_ids)))

    # --------------------------------------------------------------------- threads
    def _send_loop(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self._conn.send(message)
            except (OSError, ValueError):
                return
            if isinstance(message, Shutdown):
                return

    def _receive_loop(self) -> None:
        while True:
            try:
                result = self._conn.recv()
            except (EOFError, OSError):
                break
            self._call_in_loop(self._dispatch, result)
        self._call_in_loop(self._engine_died)

    def _call_in_loop(self, callback, *args) -> None:
        """Run `callback` in the consumer's loop; with none attached, only the snapshot
        matters (no stream can be waiting), so run it here."""
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(callback, *args)
                return
            except RuntimeError:   # that loop has closed
                pass
        callback(*args)

    def _dispatch(self, result: StepResult) -> None:
        if result.snapshot is not None:
            self.snapshot = result.snapshot
        for failure in result.failures:
            stream = self._streams.get(failure.request_id)
            if stream is not None:
                stream.put_nowait(_failure_error(failure))
        for delta in result.deltas:
            stream = self._streams.get(delta.request_id)
            if stream is not None:
                stream.put_nowait(delta)

    def _engine_died(self) -> None:
        self.dead_reason = self.dead_reason or self._exit_description()
        if self._process is not None and not self._shutting_down:
            logger.error("%s", self.dead_reason)
        for stream in self._streams.values():
            stream.put_nowait(EngineDeadError(self.dead_reason))


def _failure_error(failure: RequestFailed) -> BaseException:
    if failure.kind == "invalid":
        return InvalidRequestError(failure.message, param=failure.param)
    if failure.kind == "overloaded":
        return EngineOverloadedError(failure.message)
    return EngineInternalError(failure.message)
