"""The engine core inside a Ray actor: `EngineCoreHost` is the actor's class body.

The actor runs the same `run_engine_core` the local engine process runs (engine_core.py), in
a thread, over a `QueueConnection`: two in-process queues with a pipe's send / recv / poll.
The API side feeds messages in with `submit` and long-polls results out with `fetch`; Ray
carries both calls. This module imports no Ray, so the actor's logic runs without it too.
"""
from __future__ import annotations

import os
import socket
import threading
from collections import deque

from kvport.core.config import EngineConfig
from kvport.core.engine_core import run_engine_core


class QueueConnection:
    """The engine core's end of an in-process connection; the host drives the other end.

    Core side (what run_engine_core and EngineCoreLoop call): send, recv, poll.
    Host side: put (messages for the core), take (the core's messages), core_exited.
    """

    def __init__(self):
        self._lock = threading.Condition()
        self._to_core: deque = deque()
        self._from_core: list = []
        self.core_has_exited = False

    # ----------------------------------------------------------------- core side
    def send(self, message) -> None:
        """Queue a message for the API side."""
        with self._lock:
            self._from_core.append(message)
            self._lock.notify_all()

    def recv(self):
        """The next message from the API side, waiting for one."""
        with self._lock:
            self._lock.wait_for(lambda: self._to_core)
            return self._to_core.popleft()

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Whether a message from the API side is ready, waiting up to `timeout` s (None: ever)."""
        with self._lock:
            return self._lock.wait_for(lambda: self._to_core, timeout)

    # ----------------------------------------------------------------- host side
    def put(self, messages: list) -> None:
        with self._lock:
            self._to_core.extend(messages)
            self._lock.notify_all()

    def take(self, timeout: float) -> tuple[list, bool]:
        """Everything the core sent, waiting up to `timeout` s for something; and whether the
        core has exited (after which nothing more will come)."""
        with self._lock:
            self._lock.wait_for(lambda: self._from_core or self.core_has_exited, timeout)
            messages, self._from_core = self._from_core, []
            return messages, self.core_has_exited

    def mark_core_exited(self) -> None:
        with self._lock:
            self.core_has_exited = True
            self._lock.notify_all()


class EngineCoreHost:
    """Hosts one engine core in a thread of this process (the body of kvport's Ray actor).

    Construction starts the core, which loads the model and then sends Ready (or
    StartupFailed) like any engine core; the API side reads it with `fetch`.
    """

    def __init__(self, config: EngineConfig):
        self._conn = QueueConnection()
        self._core = threading.Thread(target=self._run_core, args=(config,),
                                      name="kvport-engine-core", daemon=True)
        self._core.start()

    def _run_core(self, config: EngineConfig) -> None:
        try:
            run_engine_core(config, self._conn)
        finally:
            self._conn.mark_core_exited()

    def submit(self, messages: list) -> None:
        """Hand engine_core messages (AddRequest, AbortRequest, Shutdown) to the core, in order."""
        self._conn.put(messages)

    def fetch(self, timeout: float) -> tuple[list, bool]:
        """The core's messages since the last fetch, waiting up to `timeout` s for one, and
        whether the core has exited."""
        return self._conn.take(timeout)

    def ping(self) -> int:
        """Health check: answers with this process's id while the actor is responsive."""
        return os.getpid()

    def node_name(self) -> str:
        """The host name of the machine this replica runs on."""
        return socket.gethostname()

    def wait_stopped(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the core to exit (after Shutdown); whether it has."""
        self._core.join(timeout)
        return not self._core.is_alive()
