"""`kvport serve`: start the engine core, then the HTTP server; stop both cleanly on signals.

uvicorn owns SIGINT/SIGTERM: it stops accepting connections, gives in-flight requests up to
`shutdown_timeout` seconds, cancels the rest (which aborts them in the engine), and runs the
app's shutdown; then the engine core process is stopped and the command exits 0.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import time

import uvicorn

from kvport.core.config import EngineConfig


def _print(message: str) -> None:
    print(f"kvport: {message}", file=sys.stderr, flush=True)


def startup_summary(info, host: str, port: int, served_name: str, seconds: float,
                    replicas=()) -> list[str]:
    """What the operator sees at start; `replicas` (ReplicaStatus) when there are several."""
    kv_scope = f"per replica, {len(replicas)} replicas; " if len(replicas) > 1 else ""
    lines = [
        f"model        {info.model_path} ({info.architecture}) as {served_name!r}",
        f"platform     {info.platform}, attention backend {info.attention_backend}, "
        f"dtype {info.dtype}" + (f", quantization {info.quantization}"
                                 if info.quantization else ""),
        f"KV cache     {info.num_blocks} blocks x {info.block_size} tokens = "
        f"{info.token_capacity} tokens; {kv_scope}max_model_len {info.max_model_len}",
    ]
    if len(replicas) > 1:
        lines += [f"replica {r.index:<4} pid {r.pid} on {r.node or 'this machine'}"
                  for r in replicas]
    return lines + [f"ready in     {seconds:.1f} s"]


def serve(config: EngineConfig, host: str, port: int, api_key: str | None = None,
          shutdown_timeout: float = 30.0, log_level: str = "info") -> int:
    """Run the server until a signal; returns the process exit code."""
    from kvport.api.app import ServerSettings, build_app
    from kvport.core.async_engine import EngineStartupError
    from kvport.core.engine_client import build_engine_client
    from kvport.core.model_info import resolve_model
    from kvport.core.tokenizer import load_tokenizer

    started = time.monotonic()
    _print("starting the engine (loading the model)...")
    try:
        engine = build_engine_client(config)
        info = engine.start()
    except EngineStartupError as exc:
        _print(f"error: the engine could not start: {exc}")
        return 1
    try:
        tokenizer = load_tokenizer(resolve_model(config.model.model), config.model.tokenizer)
        served_name = config.model.served_model_name or info.model_name
        app = build_app(engine, tokenizer, ServerSettings(served_model_name=served_name,
                                                          api_key=api_key))
        for line in startup_summary(info, host, port, served_name, time.monotonic() - started,
                                    engine.replica_status()):
            _print(line)
        server = _AnnouncingServer(uvicorn.Config(
            app, host=host, port=port, log_level=log_level,
            timeout_graceful_shutdown=shutdown_timeout))
        with _absorb_reraised_signals():
            server.run()
        return 0 if server.started else 1
    finally:
        engine.shutdown()


@contextlib.contextmanager
def _absorb_reraised_signals():
    """After its graceful shutdown, uvicorn re-raises the signal that stopped it to whatever
    handler was installed before; with the default one the process dies by SIGTERM (exit
    -15) before the engine core is stopped. Install handlers that only note the signal."""
    def note(signum, _frame):
        _print(f"stopped by {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _AnnouncingServer(uvicorn.Server):
    """uvicorn.Server that says where it listens once the socket is bound."""

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if self.started:
            _print(f"serving on http://{self.config.host}:{self.config.port}")
