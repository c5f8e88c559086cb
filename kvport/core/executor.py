"""MultiprocExecutor: tensor parallelism behind the Worker interface, framework-free.

The engine and its single scheduler see one Worker. Behind it, one process per rank (spawned,
so no framework state is inherited) runs the platform's real worker for its slice of the
model (kvport/core/executor_process.py):

    engine --execute_model(SchedulerOutput)--> executor --pipe--> rank 0 .. rank N-1
                                                         <------- rank 0's ModelRunnerOutput

Every call goes to every rank in the same order, so the ranks meet in the same collectives.
Rank 0's answer is the step's output; the KV block count is the smallest any rank can hold.
With async scheduling a launch is sent without waiting, and rank 0's answer to it carries
the previous step's output (executor_process.py), read when the engine asks for that step.

Supervision: every wait watches every process's sentinel as well as its pipe, so a rank that
dies (killed, out of memory, crashed in a kernel) or raises is noticed at once, during the
call in progress or at the next one. The executor then ends every other rank (they may be
stuck in a collective waiting for the dead one) and raises WorkerDiedError naming the rank,
its pid and how it ended. It never waits on a dead rank.
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import pickle
import signal
import socket
import weakref
from collections import deque
from typing import Any

from kvport.core.config import ConfigError, EngineConfig
from kvport.core.executor_process import (FIRST_RANK_ONLY, WorkerProcessSpec,
                                          run_worker_process)
from kvport.core.model_info import ModelInfo
from kvport.core.tensor_parallel import TensorParallelRank, check_model_fits
from kvport.core.worker import ModelRunnerOutput, PendingOutput, SchedulerOutput, Worker

logger = logging.getLogger(__name__)

# Seconds a rank gets to leave cleanly (shutdown) or after SIGTERM, before SIGKILL.
EXIT_GRACE_S = 10.0


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker process died or failed; the engine cannot go on."""


def build_worker(config: EngineConfig, model_info: ModelInfo, platform, registry) -> Worker:
    """The engine's Worker: the platform's own for one device, a MultiprocExecutor for
    tensor_parallel_size > 1."""
    from kvport.platforms.registry import import_object

    if config.parallel.tensor_parallel_size > 1:
        return MultiprocExecutor(config, model_info, platform, registry)
    worker_class = import_object(platform.worker_class())
    return worker_class(config, model_info, platform, registry)


class MultiprocExecutor(Worker):
    """One worker process per tensor-parallel rank, driven as one Worker."""

    def __init__(self, config: EngineConfig, model_info: ModelInfo, platform, registry=None):
        super().__init__(config, model_info, platform, registry)
        size = config.parallel.tensor_parallel_size
        self._check_supported(size)
        self.size = size
        self.processes: list = []
        self._conns: list = []
        self._failure: str | None = None
        # Async steps: which launched step each of rank 0's awaited answers carries (None:
        # an answer with no output), the step the ranks hold, and outputs received early.
        self._expected: deque[int | None] = deque()
        self._rank_pending: int | None = None
        self._outputs: dict[int, ModelRunnerOutput] = {}
        self._next_step = 0
        self._start(size)

    # ----------------------------------------------------------------- start-up
    def _check_supported(self, size: int) -> None:
        """Refuse what cannot be sharded before any process starts."""
        from kvport.platforms.registry import import_object

        check_model_fits(size, self.model_info)
        worker_class = import_object(self.platform.worker_class())
        if not getattr(worker_class, "supports_tensor_parallel", False):
            raise ConfigError(f"tensor_parallel_size {size}: the {self.platform.device_type} "
                              f"worker ({worker_class.__name__}) has no tensor parallelism")
        if self.config.model.quantization:
            raise ConfigError(f"quantization {self.config.model.quantization} cannot be "
                              f"combined with tensor_parallel_size {size} yet (the quantized "
                              "layers have no sharded form); use one or the other")

    def _start(self, size: int) -> None:
        context = multiprocessing.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        backend = self.platform.distributed_backend()
        for rank in range(size):
            parent_end, child_end = context.Pipe(duplex=True)
            spec = WorkerProcessSpec(self.config, self.model_info, self.platform.name,
                                     TensorParallelRank(rank, size, init_method, backend))
            process = context.Process(target=run_worker_process, args=(spec, child_end),
                                      name=f"kvport-tp{rank}", daemon=True)
            process.start()
            child_end.close()
            self.processes.append(process)
            self._conns.append(parent_end)
        # Dropped without shutdown() (an exception in the engine's constructor, a test), or
        # failed: the processes go at once.
        self._finalizer = weakref.finalize(self, _end_processes, list(self.processes), 0.0)
        logger.info("started %d tensor-parallel worker processes (%s, %s): pids %s", size,
                    self.platform.device_type, backend, [p.pid for p in self.processes])
        self._receive(range(size), "start-up")

    @property
    def pids(self) -> list[int]:
        """Process ids of the ranks, rank 0 first."""
        return [p.pid for p in self.processes]

    # ------------------------------------------------------------ Worker interface
    def init_device(self) -> None:
        """Every rank binds its device and joins the group."""
        self._call("init_device")

    def load_model(self) -> None:
        """Every rank loads its slice of the model."""
        self._call("load_model")

    def determine_available_kv_blocks(self) -> int:
        """The smallest block count any rank can hold (they share block ids)."""
        return min(self._call("determine_available_kv_blocks"))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Every rank allocates `num_blocks` blocks of its own KV heads."""
        self._call("initialize_kv_cache", num_blocks)

    def warm_up(self) -> None:
        """Every rank warms up (graph capture) in lockstep."""
        self._call("warm_up")

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Every rank runs the step; rank 0 (which sampled) answers."""
        return self._call("execute_model", scheduler_output)[0]

    def prefers_async_scheduling(self) -> bool:
        """Overlap pays when it pays for every rank's worker."""
        return all(self._call("prefers_async_scheduling"))

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> PendingOutput:
        """Every rank launches the step; nothing is awaited here. Rank 0's answer to this call
        is the previous step's output, collected when the engine asks for it."""
        step = self._next_step
        self._next_step += 1
        self._send("execute_model_async", scheduler_output)
        self._expected.append(self._rank_pending)
        self._rank_pending = step
        return _ExecutorStep(self, step)

    def _step_output(self, step: int) -> ModelRunnerOutput:
        """The output of launched step `step`, reading rank 0's answers in order."""
        while step not in self._outputs:
            if not self._expected:
                self._flush()
            self._receive_step_answer()
        return self._outputs.pop(step)

    def _flush(self) -> None:
        self._send("flush_pending")
        self._expected.append(self._rank_pending)
        self._rank_pending = None

    def _drain(self) -> None:
        """Collect every launched step's output before a call that is not a step."""
        if self._rank_pending is not None:
            self._flush()
        while self._expected:
            self._receive_step_answer()

    def _receive_step_answer(self) -> None:
        """Rank 0's next answer to a launch or flush: the output of the step it carries."""
        carried = self._expected.popleft()
        answer = self._receive([0], "execute_model_async")[0]
        if carried is not None:
            self._outputs[carried] = answer

    def shutdown(self) -> None:
        """Ask every rank to leave, then make sure each has (SIGTERM, then SIGKILL)."""
        if self._failure is not None:
            return                               # already ended
        try:
            self._call("shutdown")
        except WorkerDiedError as exc:
            logger.warning("tensor-parallel shutdown: %s", exc)
            return
        self._failure = "the executor was shut down"
        self._finalizer.detach()
        _end_processes(self.processes, EXIT_GRACE_S)

    # ------------------------------------------------------------------ calls
    def _call(self, method: str, *args: Any) -> list:
        """Send `method(*args)` to every rank; the answers of those that answer, by rank."""
        self._drain()
        self._send(method, *args)
        answering = [0] if method in FIRST_RANK_ONLY else range(self.size)
        return self._receive(answering, method)

    def _send(self, method: str, *args: Any) -> None:
        """`method(*args)` to every rank, in the same order for all (pickled once)."""
        if self._failure is not None:
            raise WorkerDiedError(self._failure)
        payload = pickle.dumps((method, args), pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self._conns):
            try:
                conn.send_bytes(payload)
            except OSError:
                self._fail_dead(rank, method)

    def _receive(self, ranks, method: str) -> list:
        """One answer from each of `ranks`, watching every rank's pipe and sentinel."""
        waiting = set(ranks)
        answers: dict[int, Any] = {}
        by_object = {conn: rank for rank, conn in enumerate(self._conns)}
        by_object.update({p.sentinel: rank for rank, p in enumerate(self.processes)})
        while waiting:
            ready = multiprocessing.connection.wait(list(by_object))
            # pipes first: a rank that reported an error and exited has both ready
            for obj in sorted(ready, key=lambda o: not hasattr(o, "recv_bytes")):
                rank = by_object[obj]
                if not hasattr(obj, "recv_bytes"):
                    self._fail_dead(rank, method)
                try:
                    status, *body = pickle.loads(obj.recv_bytes())
                except (EOFError, OSError):
                    self._fail_dead(rank, method)
                if status == "error":
                    self._fail_raised(rank, method, *body)
                if rank not in waiting:
                    self._fail(f"internal error: tensor-parallel rank {rank} answered {method}, "
                               "which only rank 0 answers")
                answers[rank] = body[0]
                waiting.discard(rank)
        return [answers[r] for r in sorted(answers)]

    # ---------------------------------------------------------------- failures
    def _fail_dead(self, rank: int, method: str) -> None:
        conn, process = self._conns[rank], self.processes[rank]
        try:
            if conn.poll(0):                     # its last words, if it had any
                status, *body = pickle.loads(conn.recv_bytes())
                if status == "error":
                    self._fail_raised(rank, method, *body)
        except (EOFError, OSError, pickle.UnpicklingError):
            pass
        process.join(EXIT_GRACE_S)       # it closed its pipe: it is exiting, if not gone
        self._fail(f"tensor-parallel worker rank {rank} (pid {process.pid}) "
                   f"{_describe_exit(process.exitcode)} during {method}; the engine cannot "
                   "continue without it")

    def _fail_raised(self, rank: int, method: str, exc: BaseException | None, summary: str,
                     remote_traceback: str) -> None:
        message = f"tensor-parallel worker rank {rank} failed during {method}: {summary}"
        cause = _RemoteTraceback(remote_traceback)
        if method in ("start-up", "init_device", "load_model") and isinstance(exc, Exception):
            self._end_all(message)
            raise exc from cause                 # e.g. a ConfigError stays a ConfigError
        self._fail(message, cause)

    def _fail(self, message: str, cause: BaseException | None = None) -> None:
        self._end_all(message)
        raise WorkerDiedError(message) from cause

    def _end_all(self, message: str) -> None:
        logger.error("%s; ending all %d tensor-parallel worker processes", message, self.size)
        self._failure = message
        self._finalizer()


class _RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker process (shown as the cause)."""

    def __init__(self, text: str):
        super().__init__(text)

    def __str__(self) -> str:
        return "\n" + self.args[0]


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "closed its pipe but did not exit"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _end_processes(processes: list, grace: float) -> None:
    """Give every process `grace` seconds to exit; SIGTERM those still running, then SIGKILL
    after EXIT_GRACE_S. Only these processes, by their own handles."""
    for process in processes:
        if grace and process.exitcode is None:
            process.join(grace)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(EXIT_GRACE_S)
        if process.is_alive():
            process.kill()
            process.join(EXIT_GRACE_S)


def _free_port() -> int:
    """A TCP port free on the loopback interface now, for the ranks to meet on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _ExecutorStep(PendingOutput):
    """A step launched on every rank; rank 0's output arrives with a later answer."""

    def __init__(self, executor: MultiprocExecutor, step: int):
        self.executor = executor
        self.step = step
        self.output: ModelRunnerOutput | None = None

    def result(self) -> ModelRunnerOutput:
        if self.output is None:
            self.output = self.executor._step_output(self.step)
        return self.output
