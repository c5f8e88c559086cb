"""The OpenAI server suite (tests/test_server_openai.py) against `kvport serve --device cuda`.

The suite is not copied: its tests are imported and collected again here, and the two server
fixtures they use are overridden to start the server on the cuda platform (CUDA graphs on,
float32 so that concurrent and sequential runs give the same greedy tokens). Skipped without
a GPU. The GPU machine has no SmolLM2 weights: the small-queue tests run on the tiny model,
and the real-text check stays with the CPU suite.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU test: torch sees no GPU")

from server_fixtures import ServerProcess  # noqa: E402
from test_server_openai import *  # noqa: E402,F401,F403 (the suite's tests and fixtures)
from test_server_openai import API_KEY, MAX_MODEL_LEN, MODEL  # noqa: E402

DEVICE = "cuda"


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    process = ServerProcess(tiny_llama_dir, "--served-model-name", MODEL, "--max-model-len",
                            str(MAX_MODEL_LEN), "--num-blocks", "1024", "--dtype", "float32",
                            api_key=API_KEY, device=DEVICE)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def queue_server(tiny_llama_dir):
    """One running request and one waiting request at most; everything else gets 503."""
    process = ServerProcess(tiny_llama_dir, "--max-model-len", "256", "--num-blocks", "128",
                            "--max-num-seqs", "1", "--max-waiting-requests", "1",
                            "--dtype", "float32", device=DEVICE)
    yield process
    process.stop()


@pytest.mark.skip(reason="needs SmolLM2's weights, which the GPU machine does not have; "
                         "tests/test_server_openai.py checks it on the CPU")
def test_real_text():
    """Replaces the suite's test of the same name here."""


def test_the_server_runs_on_the_cuda_platform(server):
    """Guards the override: the suite above really talks to a cuda server."""
    assert f"--device {DEVICE}" in " ".join(server.process.args)
