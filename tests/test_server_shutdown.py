"""SIGTERM / SIGINT: stop accepting, end in-flight requests within the timeout, exit 0,
and leave no engine core process behind."""
import signal
import threading
import time

import httpx
import psutil
import pytest

from server_fixtures import ServerProcess


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_streams_and_exits_zero(tiny_llama_dir, signum):
    server = ServerProcess(tiny_llama_dir, "--max-model-len", "512", "--num-blocks", "256",
                           "--shutdown-timeout", "2")
    children = psutil.Process(server.process.pid).children(recursive=True)
    assert any("spawn" in " ".join(c.cmdline()) for c in children), "no engine core process"
    seen = {"chunks": 0, "ended": False}

    def stream_forever():
        body = {"prompt": "hello", "max_tokens": 480, "n": 4, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        seen["chunks"] += 1
        except httpx.HTTPError:
            pass                   # the connection closed under us: also an ending
        seen["ended"] = True

    thread = threading.Thread(target=stream_forever, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while seen["chunks"] < 3:
        assert time.monotonic() < deadline, "the stream never started"
        time.sleep(0.05)
    started = time.monotonic()
    server.process.send_signal(signum)
    assert server.process.wait(20) == 0, server.output()
    assert time.monotonic() - started < 15
    thread.join(10)
    assert seen["ended"]
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=2)
    time.sleep(0.5)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
