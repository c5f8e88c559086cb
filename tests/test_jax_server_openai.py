"""The OpenAI server suite (tests/test_server_openai.py) against `kvport serve --device xla`:
kvport-tpu's JAX worker on JAX's CPU backend, behind the same HTTP server.

The suite is not copied: its tests are imported and collected again here, and the two
server fixtures they use are overridden to start the server on the xla platform. Fixtures
resolve by name from the module that collects the test, so every imported test runs against
these servers.
"""
from __future__ import annotations

import pytest

from server_fixtures import ServerProcess
from test_server_openai import *  # noqa: F401,F403 (the suite's tests and fixtures)
from test_server_openai import API_KEY, MAX_MODEL_LEN, MODEL

DEVICE = "xla"


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    process = ServerProcess(tiny_llama_dir, "--served-model-name", MODEL, "--max-model-len",
                            str(MAX_MODEL_LEN), "--num-blocks", "1024", api_key=API_KEY,
                            device=DEVICE)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def queue_server(smollm2_path):
    """One running request and one waiting request at most; everything else gets 503."""
    process = ServerProcess(smollm2_path, "--max-model-len", "1024", "--num-blocks", "128",
                            "--max-num-seqs", "1", "--max-waiting-requests", "1",
                            device=DEVICE)
    yield process
    process.stop()


def test_the_server_runs_on_the_xla_platform(server):
    """Guards the override: the suite above really talks to an xla server."""
    assert f"--device {DEVICE}" in " ".join(server.process.args)
