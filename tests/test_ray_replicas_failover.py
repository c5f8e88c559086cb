"""A replica dies mid-run: nothing that had not started streaming is lost, and serving goes on.

Two Ray replicas of the tiny model on a private local Ray instance (loopback), each running at
most two requests at a time so that most of a burst waits in the replicas' queues. While the
burst streams, the busier replica's actor process is SIGKILLed (its pid is in the server's
start-up summary). Every request that had not received a token moves to the other replica
and completes in full; only requests that had started streaming may end with an error event.
Then the last replica hangs (SIGSTOP): its health check times out, the server removes it, and
/health and new requests answer 503.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time

import httpx
import pytest

from server_fixtures import ServerProcess, scrape, wait_until_idle

MAX_TOKENS = 48
NUM_REQUESTS = 10


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    process = ServerProcess(tiny_llama_dir, "--max-model-len", "256", "--num-blocks", "256",
                            "--max-num-seqs", "2", "--data-parallel-size", "2",
                            "--distributed-executor", "ray",
                            "--replica-health-check-interval", "1",
                            "--replica-health-check-timeout", "5")
    yield process
    process.stop()


def replica_pids(server: ServerProcess) -> dict[int, int]:
    """Replica index -> actor process id, from the start-up summary."""
    found = re.findall(r"replica (\d+)\s+pid (\d+)", server.output())
    return {int(index): int(pid) for index, pid in found}


class StreamRecord:
    """What one streamed completion saw: token chunks, its usage, and any error."""

    def __init__(self):
        self.chunks = 0
        self.completion_tokens: int | None = None
        self.error: dict | None = None
        self.status: int | None = None
        self.finish_reason: str | None = None


async def stream_completion(client: httpx.AsyncClient, url: str, index: int,
                            record: StreamRecord) -> None:
    body = {"prompt": f"burst request {index} " * 4, "max_tokens": MAX_TOKENS,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        record.status = response.status_code
        if response.status_code != 200:
            record.error = json.loads(await response.aread())["error"]
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                record.error = event["error"]
                return
            if event.get("usage"):
                record.completion_tokens = event["usage"]["completion_tokens"]
            for choice in event["choices"]:   # the usage chunk has none
                record.chunks += 1
                record.finish_reason = choice["finish_reason"] or record.finish_reason


async def burst_and_kill(server: ServerProcess, pids: dict[int, int]) -> tuple[list, int]:
    """Stream NUM_REQUESTS completions; kill the busier replica once two are streaming."""
    records = [StreamRecord() for _ in range(NUM_REQUESTS)]
    async with httpx.AsyncClient(timeout=120) as client:
        tasks = [asyncio.create_task(stream_completion(client, server.url, i, record))
                 for i, record in enumerate(records)]
        deadline = time.monotonic() + 60
        while sum(record.chunks > 0 for record in records) < 2:
            assert time.monotonic() < deadline, "the burst never started streaming"
            assert not all(task.done() for task in tasks), [r.error for r in records]
            await asyncio.sleep(0.005)
        health = (await client.get(server.url + "/health")).json()
        victim = max(health["replicas"], key=lambda replica: replica["outstanding"])
        # More outstanding than it may run at once: some of its requests wait, token-less.
        assert victim["outstanding"] > 2, health
        os.kill(pids[victim["index"]], signal.SIGKILL)
        await asyncio.gather(*tasks)
    return records, victim["index"]


def test_killing_a_replica_loses_no_request_that_had_not_started_streaming(server):
    pids = replica_pids(server)
    assert sorted(pids) == [0, 1] and len(set(pids.values())) == 2, server.output()
    records, victim = asyncio.run(burst_and_kill(server, pids))

    # A request fails only after output reached its client (the kill may land between the
    # server sending a token and the client reading it, so the client's view at the moment of
    # the kill cannot tell): at most the victim's two running requests, each with a token.
    failed = [record for record in records if record.error is not None]
    assert len(failed) <= 2, [record.error for record in failed]
    for record in records:
        assert record.status == 200, record.error
        if record.error is not None:
            assert record.chunks > 0, record.error
            assert record.error["code"] == "internal_error"
            assert "started streaming" in record.error["message"], record.error
        else:   # everything else completed in full, wherever it ended up
            assert record.finish_reason == "length", vars(record)
            assert record.completion_tokens == MAX_TOKENS, vars(record)

    metrics = scrape(server.url)
    rerouted = metrics[f"kvport:replica_requests_rerouted_total{{replica={victim}}}"]
    assert rerouted >= 1       # the kill did catch requests waiting on the victim
    assert metrics[f"kvport:replica_healthy{{replica={victim}}}"] == 0
    assert metrics[f"kvport:replica_healthy{{replica={1 - victim}}}"] == 1

    # The front end keeps serving, on the replica that is left.
    health = httpx.get(server.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    dead = health.json()["replicas"][victim]
    assert not dead["alive"] and "Ray actor died" in dead["reason"]
    after = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"prompt": "still there?", "max_tokens": 4, "ignore_eos": True})
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 4
    wait_until_idle(server.url)

    # The last replica hangs: no ping answered within 5 s removes it (and Ray kills the
    # stopped process). No replica left: a clear 503, on /health and on requests.
    os.kill(pids[1 - victim], signal.SIGSTOP)
    stopped = time.monotonic()
    while (health := httpx.get(server.url + "/health", timeout=10)).status_code == 200:
        assert time.monotonic() < stopped + 30, "the hung replica was never removed"
        time.sleep(0.2)
    assert time.monotonic() - stopped >= 5   # not before its timeout
    assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
    message = health.json()["error"]["message"]
    assert "all 2 replicas have failed" in message
    assert "did not answer a health check within 5 s" in message
    refused = httpx.post(server.url + "/v1/completions", timeout=60,
                         json={"prompt": "anyone?", "max_tokens": 4})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_dead"
