"""Start llama.cpp's `llama-server` as a benchmark peer and stop it afterwards.

`--launch-llama-server BIN:GGUF[:PARALLEL]` in `kvport bench serve` uses this, so the peer runs
in the same run (same machine state) as the server it is compared with. Build the binary with
`scripts/build_llama_server.sh` (cached in ~/.cache/kvport-peers/llama-server).
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import httpx

DEFAULT_PARALLEL = 8
DEFAULT_BINARY = os.path.expanduser("~/.cache/kvport-peers/llama-server")


@dataclass
class LlamaServerSpec:
    binary: str
    gguf: str
    parallel: int = DEFAULT_PARALLEL

    @classmethod
    def parse(cls, text: str) -> "LlamaServerSpec":
        """'BIN:GGUF' or 'BIN:GGUF:PARALLEL'; an empty BIN means the cached default binary."""
        parts = text.split(":")
        parallel = DEFAULT_PARALLEL
        if len(parts) == 3 and parts[2].isdigit():
            parallel = int(parts.pop())
        if len(parts) != 2 or not parts[1]:
            raise ValueError(f"expected BIN:GGUF[:PARALLEL], got {text!r}")
        return cls(os.path.expanduser(parts[0] or DEFAULT_BINARY),
                   os.path.expanduser(parts[1]), parallel)

    @property
    def name(self) -> str:
        return f"llama.cpp-np{self.parallel}"


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM it when the benchmark dies, even by
    SIGKILL, so no orphaned llama-server keeps its cores busy and skews later runs."""
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LlamaServer:
    """A running llama-server; use as a context manager, or call start()/stop()."""
    spec: LlamaServerSpec
    ctx_size: int = 16384
    threads: int = 2
    port: int = 0
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    log_path: str = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def command(self) -> list[str]:
        # -c is the total context shared by the -np slots: each slot gets ctx_size / parallel.
        return [self.spec.binary, "-m", self.spec.gguf, "--host", "127.0.0.1",
                "--port", str(self.port), "-np", str(self.spec.parallel),
                "-c", str(self.ctx_size), "-t", str(self.threads), "--no-webui",
                *self.extra_args]

    def start(self, ready_timeout_s: float = 180.0) -> "LlamaServer":
        if not os.access(self.spec.binary, os.X_OK):
            raise FileNotFoundError(f"llama-server binary {self.spec.binary!r} not found: "
                                    "run scripts/build_llama_server.sh")
        self.port = self.port or free_port()
        log = tempfile.NamedTemporaryFile("wb", prefix="llama-server-", suffix=".log",
                                          delete=False)
        self.log_path = log.name
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL,
                                        preexec_fn=_die_with_parent)
        log.close()
        self._wait_ready(ready_timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        # /health answers 503 while the model loads and 200 once slots accept requests.
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}:\n"
                                   + self.log_tail())
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"llama-server not ready after {timeout_s:.0f}s:\n" + self.log_tail())

    def log_tail(self, chars: int = 2000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "LlamaServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
