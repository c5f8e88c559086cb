"""Run the real `kvport serve` in a subprocess on a loopback port, for end-to-end tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m kvport.api.cli serve MODEL --device DEVICE ...`, stopped with SIGTERM."""

    def __init__(self, model: str, *options: str, api_key: str | None = None,
                 startup_timeout: float = 240.0, device: str = "cpu"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        command = [sys.executable, "-m", "kvport.api.cli", "serve", model, "--device", device,
                   "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
                   *options]
        if api_key:
            command += ["--api-key", api_key]
        env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   KVPORT_LOG_LEVEL="WARNING")
        self.log = tempfile.NamedTemporaryFile("w+", prefix="kvport-server-", suffix=".log")
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT)
        self._wait_ready(startup_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n"
                                   + self.output())
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the server was not ready within {timeout} s:\n" + self.output())

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-8000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def scrape(url: str) -> dict[str, float]:
    """GET /metrics as {"name{labels}" or "name": value}, labels minus model_name."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "model_name"}
            key = sample.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
                                 + "}" if labels else "")
            values[key] = sample.value
    return values


def wait_until_idle(url: str, timeout: float = 30.0) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits and no KV block is held; return them."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = scrape(url)
        if (metrics["kvport:kv_cache_usage_perc"] == 0 and metrics["kvport:num_requests_running"]
                == 0 and metrics["kvport:num_requests_waiting"] == 0):
            return metrics
        if time.monotonic() > deadline:
            raise AssertionError(f"the engine is still busy after {timeout} s: {metrics}")
        time.sleep(0.1)
