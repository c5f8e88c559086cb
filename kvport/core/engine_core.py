"""The engine core in its own process: the step loop never waits on HTTP, HTTP never on a step.

The API process talks to it over one duplex pipe with these messages (all plain, picklable):

    API -> core   AddRequest, AbortRequest, Shutdown
    core -> API   Ready | StartupFailed (once), then StepResult per step and RequestFailed

The loop drains every pending message between steps, runs one step when there is work, and
sends that step's deltas in one message. It blocks on the pipe only when idle.
"""
from __future__ import annotations

import logging
import os
import traceback
from dataclasses import dataclass, field

from kvport.core.config import EngineConfig
from kvport.core.engine import EngineOverloadedError, EngineSnapshot, LLMEngine
from kvport.core.request import RequestDelta
from kvport.core.sampling_params import InvalidRequestError, SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class AbortRequest:
    request_ids: list[str]


@dataclass
class Shutdown:
    """Abort whatever is running and exit."""


@dataclass
class EngineInfo:
    """What the API process needs to know about the engine it started."""
    model_name: str
    model_path: str
    architecture: str
    max_model_len: int
    dtype: str
    quantization: str | None
    platform: str
    attention_backend: str
    num_blocks: int
    block_size: int
    vocab_size: int
    pid: int

    @property
    def token_capacity(self) -> int:
        return self.num_blocks * self.block_size


@dataclass
class Ready:
    info: EngineInfo


@dataclass
class StartupFailed:
    message: str
    traceback: str


@dataclass
class RequestFailed:
    request_id: str
    kind: str          # "invalid" (400), "overloaded" (503), "internal" (500)
    message: str
    param: str | None = None


@dataclass
class StepResult:
    deltas: list[RequestDelta] = field(default_factory=list)
    failures: list[RequestFailed] = field(default_factory=list)
    snapshot: EngineSnapshot | None = None


def engine_info(engine: LLMEngine) -> EngineInfo:
    config, info = engine.config, engine.model_info
    return EngineInfo(
        model_name=info.name, model_path=info.path, architecture=info.architecture,
        max_model_len=engine.max_model_len, dtype=config.model.dtype,
        quantization=config.model.quantization, platform=engine.platform.device_type,
        attention_backend=type(engine.worker.attn_backend).name
        if getattr(engine.worker, "attn_backend", None) else "",
        num_blocks=engine.num_blocks, block_size=config.cache.block_size,
        vocab_size=info.vocab_size, pid=os.getpid())


def run_engine_core(config: EngineConfig, conn) -> None:
    """Process entry point: build the engine, announce it, then serve the pipe until told."""
    logging.basicConfig(level=os.environ.get("KVPORT_LOG_LEVEL", "INFO"))
    try:
        engine = LLMEngine(config)
    except BaseException as exc:  # reported to the parent, which exits with the message
        # Bad input (configuration, device choice, model files) is said in one message; a
        # traceback is for bugs.
        trace = "" if _is_user_error(exc) else traceback.format_exc()
        conn.send(StartupFailed(f"{type(exc).__name__}: {exc}", trace))
        return
    conn.send(Ready(engine_info(engine)))
    try:
        EngineCoreLoop(engine, conn).run()
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the API process is gone: nothing left to serve
    except BaseException:
        logger.exception("the engine core crashed")   # the API process sees the pipe close
        raise
    finally:
        engine.shutdown()


def _is_user_error(exc: BaseException) -> bool:
    from kvport.platforms.errors import PlatformSelectionError
    return isinstance(exc, (ValueError, PlatformSelectionError))


class EngineCoreLoop:
    """Alternates between draining the pipe and running one engine step."""

    def __init__(self, engine: LLMEngine, conn):
        self.engine = engine
        self.conn = conn
        self.failures: list[RequestFailed] = []
        self.stopping = False

    def run(self) -> None:
        while not self.stopping:
            idle = not self.engine.has_unfinished_requests() and not self.failures
            if idle:
                self.conn.poll(None)
            while not self.stopping and self.conn.poll(0):
                self.handle(self.conn.recv())
            if self.stopping:
                break
            deltas = self.engine.step_deltas() if self.engine.has_unfinished_requests() else []
            if deltas or self.failures:
                self.conn.send(StepResult(deltas, self.failures, self.engine.snapshot()))
                self.failures = []

    def handle(self, message) -> None:
        if isinstance(message, AddRequest):
            self.add(message)
        elif isinstance(message, AbortRequest):
            for request_id in message.request_ids:
                self.engine.abort(request_id)
            self.conn.send(StepResult(snapshot=self.engine.snapshot()))
        elif isinstance(message, Shutdown):
            self.engine.abort_all()
            self.stopping = True
        else:
            logger.error("engine core got an unknown message %r", type(message).__name__)

    def add(self, message: AddRequest) -> None:
        try:
            self.engine.add_request(message.request_id, message.prompt_token_ids, message.params)
        except InvalidRequestError as exc:
            self.failures.append(RequestFailed(message.request_id, "invalid", str(exc), exc.param))
        except EngineOverloadedError as exc:
            self.failures.append(RequestFailed(message.request_id, "overloaded", str(exc)))
        except Exception as exc:  # a bug: fail the request loudly, keep serving the others
            logger.exception("adding request %s failed", message.request_id)
            self.failures.append(RequestFailed(message.request_id, "internal",
                                               f"{type(exc).__name__}: {exc}"))
