"""The example third-party plugin (examples/kvport-sdpa-example): installed by
`scripts/install.sh --test` from its directory, discovered through its entry point, and
selectable by name, from `LLM(...)` and from `kvport serve --attention-backend`. (The
conformance kit checks its numbers: tests/test_plugin_kit_cpu.py.)"""
from __future__ import annotations

import httpx
import pytest

from kvport import LLM, SamplingParams
from kvport.api.cli import build_parser, engine_config_from_args
from kvport.platforms import PluginRegistry
from server_fixtures import ServerProcess

BACKEND = "cpu_sdpa"
PROMPTS = [[(5 * i + j * j) % 290 + 3 for j in range(4 + 13 * i)] for i in range(5)]


@pytest.fixture(scope="module")
def registry() -> PluginRegistry:
    registry = PluginRegistry()
    names = [reg.name for reg in registry.attention_backends("cpu")]
    if BACKEND not in names:
        pytest.fail(f"the example plugin is not installed (CPU backends: {names}): "
                    "`bash scripts/install.sh --test` installs it, or "
                    "`pip install --no-deps -e examples/kvport-sdpa-example`")
    return registry


def greedy_tokens(path: str, backend: str, registry) -> tuple[list[list[int]], object]:
    llm = LLM(path, device="cpu", dtype="float32", attention_backend=backend,
              registry=registry, num_blocks=128, max_model_len=512)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16,
                                                   ignore_eos=True), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs], llm


def test_discovered_through_its_entry_point(registry):
    reg = next(r for r in registry.attention_backends("cpu") if r.name == BACKEND)
    origin = registry.origin(reg)
    assert (origin.name, origin.dist_name, origin.module) == (
        "sdpa_example", "kvport-sdpa-example", "kvport_sdpa_example.plugin")
    assert origin.api_range == ">=1.0,<2"
    assert reg.device_types == ("cpu",) and reg.framework == "torch"
    assert not registry.platforms() or all(registry.origin(p).name != "sdpa_example"
                                           for p in registry.platforms())


def test_selected_by_name_it_serves_the_reference_tokens(tiny_llama_dir, registry):
    from kvport_sdpa_example.attention import SdpaAttentionBackend

    ours, llm = greedy_tokens(tiny_llama_dir, BACKEND, registry)
    assert type(llm.engine.worker.attn_backend) is SdpaAttentionBackend
    reference, _ = greedy_tokens(tiny_llama_dir, "torch_reference", registry)
    assert ours == reference


def test_serve_flag_reaches_the_engine_config():
    args = build_parser().parse_args(["serve", "--device", "cpu", "--attention-backend",
                                      BACKEND])
    assert engine_config_from_args(args).device.attention_backend == BACKEND


def test_kvport_serve_with_the_example_backend(tiny_llama_dir, registry):
    server = ServerProcess(tiny_llama_dir, "--attention-backend", BACKEND, "--num-blocks", "128",
                           "--max-model-len", "512")
    try:
        reply = httpx.post(server.url + "/v1/completions", timeout=60, json={
            "prompt": PROMPTS[3], "max_tokens": 16, "temperature": 0, "ignore_eos": True})
    finally:
        server.stop()
    assert reply.status_code == 200, reply.text
    reference = LLM(tiny_llama_dir, device="cpu", dtype="float32",
                    attention_backend="torch_reference", registry=registry, num_blocks=128,
                    max_model_len=512)
    [expected] = reference.generate([PROMPTS[3]], SamplingParams(
        temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert reply.json()["choices"][0]["text"] == expected.outputs[0].text


def test_an_unknown_backend_name_lists_the_registered_ones(tiny_llama_dir, registry):
    from kvport.platforms import AttentionBackendError

    with pytest.raises(AttentionBackendError) as excinfo:
        LLM(tiny_llama_dir, device="cpu", attention_backend="no_such_backend",
            registry=registry, num_blocks=64, max_model_len=512)
    message = str(excinfo.value)
    assert "unknown attention backend 'no_such_backend'" in message
    assert BACKEND in message
