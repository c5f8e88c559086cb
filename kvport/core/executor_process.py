"""The body of one tensor-parallel worker process (the other half of kvport/core/executor.py).

The process builds the platform's real worker for its rank, answers "started", then serves
calls from the executor's pipe until told to shut down:

    executor -> process   (method name, args), pickled
    process -> executor   ("ok", result) | ("error", exception or None, "Type: message",
                          traceback text)

Rank 0 answers every call; the other ranks do not answer the step calls (their output is
rank 0's), only the calls whose result the executor combines.

Async scheduling: `execute_model_async` launches a step and answers with the output of the
step launched before it (None if there was none), so each rank finishes step N only after
step N+1 is queued on its device; `flush_pending` answers with the last launched step's
output. Every rank resolves its steps in the same order, so the placeholders in each rank's
request state are filled the same way. Any exception is reported and
ends the process: a rank that failed mid-step has left its peers inside a collective, so the
group cannot go on. The process also ends when its parent does (the pipe closes, or the
parent's sentinel fires while a step is stuck in a collective).
"""
from __future__ import annotations

import faulthandler
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
import traceback
from dataclasses import dataclass

from kvport.core.config import EngineConfig
from kvport.core.model_info import ModelInfo
from kvport.core.tensor_parallel import TensorParallelRank

logger = logging.getLogger(__name__)

# The Worker interface methods the executor forwards, in the engine's order.
WORKER_METHODS = ("init_device", "load_model", "determine_available_kv_blocks",
                  "initialize_kv_cache", "warm_up", "prefers_async_scheduling",
                  "execute_model", "shutdown")
# Async steps, served by the process loop itself (see the module docstring).
STEP_METHODS = ("execute_model_async", "flush_pending")
# Calls only rank 0 answers.
FIRST_RANK_ONLY = ("execute_model",) + STEP_METHODS


@dataclass
class WorkerProcessSpec:
    """What a worker process needs to build its worker (picklable)."""
    config: EngineConfig
    model_info: ModelInfo
    platform_name: str
    parallel: TensorParallelRank


def run_worker_process(spec: WorkerProcessSpec, conn) -> None:
    """Process entry point: build the worker, then serve the executor's calls."""
    logging.basicConfig(level=os.environ.get("KVPORT_LOG_LEVEL", "INFO"),
                        format=f"%(levelname)s tp{spec.parallel.rank} %(name)s: %(message)s")
    _exit_with_parent()
    # `kill -USR1 PID` prints every thread's stack: what a rank waits on when a step hangs
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        worker = _build_worker(spec)
    except BaseException as exc:
        _send_error(conn, exc)
        return
    conn.send_bytes(pickle.dumps(("ok", None)))
    answers_steps = spec.parallel.is_first
    steps = _AsyncSteps(worker)
    while True:
        try:
            method, args = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return          # the executor is gone: nothing left to serve
        try:
            if method in STEP_METHODS:
                result = getattr(steps, method)(*args)
            elif method in WORKER_METHODS:
                result = getattr(worker, method)(*args)
            else:
                raise ValueError(f"unknown worker method {method!r}")
        except BaseException as exc:
            _send_error(conn, exc)
            return
        if answers_steps or method not in FIRST_RANK_ONLY:
            conn.send_bytes(pickle.dumps(("ok", result), pickle.HIGHEST_PROTOCOL))
        if method == "shutdown":
            return


class _AsyncSteps:
    """A rank's launched step whose output is not collected yet."""

    def __init__(self, worker):
        self.worker = worker
        self.pending = None

    def execute_model_async(self, scheduler_output):
        """Launch this step, then finish the previous one: its output (None if none)."""
        launched = self.worker.execute_model_async(scheduler_output)
        return self._swap(launched)

    def flush_pending(self):
        """Finish the last launched step: its output (None if none)."""
        return self._swap(None)

    def _swap(self, launched):
        previous, self.pending = self.pending, launched
        return None if previous is None else previous.result()


def _build_worker(spec: WorkerProcessSpec):
    from kvport.platforms.registry import PluginRegistry, import_object

    registry = PluginRegistry()
    platform = registry.select_platform(spec.platform_name)
    worker_class = import_object(platform.worker_class())
    return worker_class(spec.config, spec.model_info, platform, registry,
                        parallel=spec.parallel)


def _send_error(conn, exc: BaseException) -> None:
    """Report `exc` to the executor (the exception itself when it pickles)."""
    summary = f"{type(exc).__name__}: {exc}"
    text = traceback.format_exc()
    try:
        payload = pickle.dumps(("error", exc, summary, text))
    except Exception:
        payload = pickle.dumps(("error", None, summary, text))
    try:
        conn.send_bytes(payload)
    except OSError:
        pass        # the executor is gone too; there is no one left to tell


def _exit_with_parent() -> None:
    """End this process as soon as the executor's process ends, even mid-collective (a
    collective waiting for a peer that will never come would otherwise keep it alive)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)
    threading.Thread(target=watch, name="kvport-parent-watch", daemon=True).start()
