"""The OpenAI server suite (tests/test_server_openai.py) against two Ray replicas.

`kvport serve --data-parallel-size 2 --distributed-executor ray` starts a private local Ray
instance (loopback) and two engine replicas as Ray actors behind one front end. The suite's
tests are imported and collected again with the server fixture overridden, as
tests/test_jax_server_openai.py does for the xla platform, so every request, stream, error,
disconnect and /metrics check of the suite runs through the router and the actors (all but
the two SmolLM2 tests, see below).
"""
from __future__ import annotations

import httpx
import pytest

from server_fixtures import ServerProcess, scrape
from test_server_openai import *  # noqa: F401,F403 (the suite's tests and fixtures)
from test_server_openai import API_KEY, MAX_MODEL_LEN, MODEL

RAY_REPLICAS = ("--data-parallel-size", "2", "--distributed-executor", "ray")


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    process = ServerProcess(tiny_llama_dir, "--served-model-name", MODEL, "--max-model-len",
                            str(MAX_MODEL_LEN), "--num-blocks", "1024", *RAY_REPLICAS,
                            api_key=API_KEY)
    yield process
    process.stop()


# Not collected here: the two SmolLM2 tests (real text, a full queue's 503). Two more SmolLM2
# replicas would cost about a minute of CI on two cores; the model's text is the single-engine
# suite's business, and a replica's 503 passes through the router unchanged.
del test_real_text, test_full_queue_gets_503_and_nothing_breaks  # noqa: F821


def test_the_suite_ran_on_two_ray_replicas_sharing_the_work(server):
    """Guards the override: after the suite, both replicas are up and both served requests."""
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["status"] == "ok"
    replicas = health["replicas"]
    assert [r["index"] for r in replicas] == [0, 1] and all(r["alive"] for r in replicas)
    assert len({r["pid"] for r in replicas}) == 2
    metrics = scrape(server.url)
    assigned = [metrics[f"kvport:replica_requests_assigned_total{{replica={i}}}"]
                for i in (0, 1)]
    assert min(assigned) > 0 and sum(assigned) >= 256, assigned
    assert metrics["kvport:replica_requests_rerouted_total{replica=0}"] == 0
    assert "--distributed-executor ray" in " ".join(server.process.args)
