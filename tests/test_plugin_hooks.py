"""Every hook is documented in docs/plugins.md with a runnable example, and tested.

The meta-tests fail when a hook is added to kvport/platforms/hookspecs.py without a
`### `name`` section and a `# example: name` code block in docs/plugins.md, or without a
`test_hook_<name>...` test in tests/. The per-hook tests below run each documented example
as a real installed plugin and check what it registers.
"""
from __future__ import annotations

import re

import pluggy
import pytest

from kvport.attention_backends.torch_reference import TorchReferenceBackend
from kvport.platforms import AttentionBackendError, hookspecs
from plugin_fakes import REPO_ROOT, FakeDists, _isolated, fakes  # noqa: F401

DOCS = REPO_ROOT / "docs" / "plugins.md"
TESTS = REPO_ROOT / "tests"


def hook_names() -> list[str]:
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    return sorted(name for name in vars(manager.hook) if not name.startswith("_"))


def doc_examples() -> dict[str, str]:
    """hook name -> the source of its `# example: name` python block in docs/plugins.md."""
    blocks = re.findall(r"```python\n(# example: (\w+)\n.*?)```", DOCS.read_text(), re.S)
    return {name: source for source, name in blocks}


def install_example(fakes: FakeDists, hook: str):
    fakes.add(f"example_{hook}", doc_examples()[hook], header="")
    return fakes.registry()


# ------------------------------------------------------------------ meta-tests

def test_hook_list_is_what_kvport_calls():
    assert hook_names() == ["kvport_register_attention_backends", "kvport_register_models",
                            "kvport_register_platforms"]


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_has_a_doc_section_and_example(hook):
    text = DOCS.read_text()
    assert f"### `{hook}`" in text, f"docs/plugins.md has no section '### `{hook}`'"
    assert hook in doc_examples(), (
        f"docs/plugins.md has no runnable example for {hook}: a ```python block whose first "
        f"line is '# example: {hook}'")


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_has_a_test(hook):
    pattern = re.compile(rf"^def test_hook_{hook}\w*\(", re.M)
    found = [p.name for p in TESTS.glob("test_*.py") if pattern.search(p.read_text())]
    assert found, f"no test in tests/ is named test_hook_{hook}...: add one"


def test_doc_examples_name_only_real_hooks():
    stale = sorted(set(doc_examples()) - set(hook_names()))
    assert not stale, f"docs/plugins.md has examples for hooks that do not exist: {stale}"


# ------------------------------------------------------------------ one test per hook

def test_hook_kvport_register_platforms_doc_example(fakes, monkeypatch):
    registry = install_example(fakes, "kvport_register_platforms")
    assert not registry.load_failures and not registry.refused_plugins
    platform = registry.select_platform("toy")
    assert type(platform).__name__ == "ToyPlatform" and platform.device_type == "toy"
    assert 0 < platform.free_memory_bytes() <= platform.total_memory_bytes()
    from kvport.core.config import EngineConfig
    config = EngineConfig.from_kwargs(device="toy")
    platform.check_and_update_config(config)
    assert config.device.num_threads >= 1
    reg = next(r for r in registry.platforms() if r.name == "toy")
    assert reg.is_available() == (True, "")
    monkeypatch.setenv("TOY_DISABLED", "1")
    assert reg.is_available() == (False, "TOY_DISABLED is set: unset it to use the toy device")
    assert reg.priority == 95 and reg.framework == "torch"


def test_hook_kvport_register_attention_backends_doc_example(fakes):
    registry = install_example(fakes, "kvport_register_attention_backends")
    assert registry.attention_backend_class("cpu_reference_copy", "cpu") is TorchReferenceBackend
    assert "cpu_reference_copy" in [r.name for r in registry.attention_backends("cpu")]
    with pytest.raises(AttentionBackendError, match="runs on cpu, not on 'cuda'"):
        registry.attention_backend_class("cpu_reference_copy", "cuda")


def test_hook_kvport_register_models_doc_example(fakes):
    from kvport.models.llama import LlamaForCausalLM

    registry = install_example(fakes, "kvport_register_models")
    assert registry.model_class("MyLlamaForCausalLM") is LlamaForCausalLM
    origin = registry.origin(next(m for m in registry.models()
                                  if m.architecture == "MyLlamaForCausalLM"))
    assert origin.name == "example_kvport_register_models"
