"""kvport.bench: metric arithmetic, prompt generation, and `bench serve` end to end against a
fake OpenAI streaming server on loopback (no model, a few seconds)."""
from __future__ import annotations

import asyncio
import json
import random
import threading

import numpy as np
import pytest

from kvport.bench.client import CompletionRequest, normalize_base_url, run_requests
from kvport.bench.llama_server import LlamaServerSpec
from kvport.bench.metrics import RequestResult, percentile, summarize
from kvport.bench.prompts import VOCABULARY, random_token_requests, word_prompts
from kvport.bench.serve import parse_concurrency, parse_peer


# ------------------------------------------------------------------ metrics
def test_request_metrics_from_timestamps():
    r = RequestResult(success=True, chunk_times=[0.1, 0.2, 0.35, 0.4], output_tokens=4)
    assert r.ttft == pytest.approx(0.1)
    assert r.latency == pytest.approx(0.4)
    assert r.itl == pytest.approx([0.1, 0.15, 0.05])
    assert r.tpot == pytest.approx((0.4 - 0.1) / 3)


def test_tpot_skips_single_token_outputs():
    assert RequestResult(success=True, chunk_times=[0.2], output_tokens=1).tpot is None


def test_percentile_matches_numpy():
    values = [random.Random(3).random() for _ in range(37)]
    for q in (0, 1, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0


def test_summarize_counts_and_throughput():
    ok = [RequestResult(success=True, chunk_times=[0.1 * k, 0.1 * k + 0.5], output_tokens=2)
          for k in range(1, 4)]
    bad = RequestResult(error="HTTP 500: boom")
    s = summarize(ok + [bad], duration_s=2.0, expected_output_tokens=3)
    assert (s["num_requests"], s["completed"], s["failed"]) == (4, 3, 1)
    assert s["total_output_tokens"] == 6
    assert s["output_throughput"] == pytest.approx(3.0)
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert s["tpot_ms"]["mean"] == pytest.approx(500.0)
    assert s["itl_ms"]["p99"] == pytest.approx(500.0)
    assert s["short_outputs"] == 3
    assert s["errors"] == ["HTTP 500: boom"]


# ------------------------------------------------------------------ prompts and parsing
def test_word_prompts_deterministic_and_fresh_per_run():
    a = word_prompts(4, 128, seed=0, run_id="r1", tag="c1")
    assert a == word_prompts(4, 128, seed=0, run_id="r1", tag="c1")
    assert all(len(p.split()) == 128 for p in a)
    assert all(w in VOCABULARY for p in a for w in p.split())
    assert len(set(a)) == 4
    assert a != word_prompts(4, 128, seed=0, run_id="r2", tag="c1")
    assert a != word_prompts(4, 128, seed=1, run_id="r1", tag="c1")
    assert a != word_prompts(4, 128, seed=0, run_id="r1", tag="c4")


def test_random_token_requests_match_the_shared_w1_generator():
    rng = random.Random(0)   # tools/peers_gpu.py's workload(), written out
    expected = [([rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))],
                 rng.randint(100, 1024)) for _ in range(5)]
    assert random_token_requests(5, (100, 1024), (100, 1024), seed=0) == expected


def test_argument_parsing():
    assert parse_concurrency("1,4, 8") == [1, 4, 8]
    with pytest.raises(ValueError):
        parse_concurrency("0,2")
    peer = parse_peer("llama.cpp=http://127.0.0.1:8081/")
    assert (peer.name, peer.base_url) == ("llama.cpp", "http://127.0.0.1:8081/v1")
    assert normalize_base_url("http://h:1/v1/") == "http://h:1/v1"
    spec = LlamaServerSpec.parse("/bin/ls:/m.gguf:16")
    assert (spec.binary, spec.gguf, spec.parallel, spec.name) == \
        ("/bin/ls", "/m.gguf", 16, "llama.cpp-np16")
    assert LlamaServerSpec.parse("/bin/ls:/m.gguf").parallel == 8


# ------------------------------------------------------------------ fake server
class FakeOpenAIServer:
    """A minimal HTTP/1.1 server on 127.0.0.1 that streams `max_tokens` SSE chunks.

    send_usage=False imitates a server that ignores stream_options.include_usage.
    """

    def __init__(self, send_usage: bool = True, token_delay_s: float = 0.001):
        self.send_usage = send_usage
        self.token_delay_s = token_delay_s
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0
        self.bodies: list[dict] = []

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _run(self):
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()
        server.close()

    async def _handle(self, reader, writer):
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            method, path, _ = head.split("\r\n")[0].split(" ")
            length = next((int(line.split(":")[1]) for line in head.split("\r\n")
                           if line.lower().startswith("content-length:")), 0)
            body = json.loads(await reader.readexactly(length)) if length else {}
            if method == "GET" and path == "/v1/models":
                payload = json.dumps({"object": "list", "data": [{"id": "fake-model"}]})
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(payload), payload.encode()))
            elif method == "POST" and path == "/v1/completions":
                self.bodies.append(body)
                await self._stream(writer, body)
            else:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
            await writer.drain()
        finally:
            writer.close()

    async def _stream(self, writer, body):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Connection: close\r\n\r\n")
        n = body["max_tokens"]
        for i in range(n):
            await asyncio.sleep(self.token_delay_s)
            chunk = {"choices": [{"index": 0, "text": f"t{i} ",
                                  "finish_reason": "length" if i == n - 1 else None}]}
            writer.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await writer.drain()
        if self.send_usage:
            usage = {"choices": [], "usage": {"prompt_tokens": len(body["prompt"].split()),
                                              "completion_tokens": n, "total_tokens": n}}
            writer.write(f"data: {json.dumps(usage)}\n\n".encode())
        writer.write(b"data: [DONE]\n\n")


def test_client_fails_requests_without_usage_unless_told_to_count_chunks():
    with FakeOpenAIServer(send_usage=False) as server:
        requests = [CompletionRequest("a b c", 5)] * 3
        strict, _ = asyncio.run(run_requests(server.url, "m", requests, 2))
        counted, _ = asyncio.run(run_requests(server.url, "m", requests, 2,
                                              count_chunks_as_tokens=True))
    assert not any(r.success for r in strict)
    assert all(r.success and r.output_tokens == 5 for r in counted)
    body = server.bodies[0]
    assert body["stream"] and body["ignore_eos"] and body["temperature"] == 0.0
    assert body["stream_options"] == {"include_usage": True}


def test_bench_serve_end_to_end_two_servers(tmp_path, capsys):
    from kvport.bench.__main__ import main

    out_json = tmp_path / "serve.json"
    argv = ["serve", "--concurrency", "1,4", "--num-requests", "8", "--output-len", "16",
            "--prompt-words", "8", "--output-json", str(out_json)]
    try:
        import matplotlib  # noqa: F401
        argv += ["--plot", str(tmp_path / "serve.png")]
    except ImportError:
        pass
    with FakeOpenAIServer() as a, FakeOpenAIServer(send_usage=False) as b:
        code = main(argv + ["--peer", f"a={a.url}", "--peer", f"b={b.url}"])
    assert code == 0
    doc = json.loads(out_json.read_text())
    points = doc["results"]
    assert [(p["server"], p["concurrency"]) for p in points] == \
        [("a", 1), ("b", 1), ("a", 4), ("b", 4)]   # interleaved by concurrency
    for p in points:
        assert p["failed"] == 0 and p["completed"] == 8
        assert p["total_output_tokens"] == 8 * 16 and p["short_outputs"] == 0
        assert p["tpot_ms"]["p50"] > 0 and p["ttft_ms"]["p99"] >= p["ttft_ms"]["p50"]
    servers = {s["name"]: s for s in doc["metadata"]["servers"]}
    assert servers["a"]["model"] == "fake-model" and servers["a"]["usage_in_stream"]
    assert servers["b"]["token_count_source"] == "streamed_chunks"
    assert all(s["ignore_eos_honoured"] for s in servers.values())
    assert doc["metadata"]["machine"]["nproc"] >= 1
    assert [(r["peer"], r["concurrency"]) for r in doc["ratios"]] == [("b", 1), ("b", 4)]
    assert len(a.bodies) == 1 + 8 + 8   # warm-up + two points
    assert "a/b" in capsys.readouterr().out
    if "--plot" in argv:
        assert (tmp_path / "serve.png").stat().st_size > 0
