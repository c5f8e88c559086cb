"""PluginRegistry against real fake plugins: distributions written to disk, found through
importlib.metadata, imported by pluggy. Nothing about the registry is mocked.

Most tests hand the registry the entry points of their own tmp directory only, so they pass
whether or not real plugins (kvport-cpu, ...) are installed; one goes through plain
``importlib.metadata.entry_points`` discovery.
"""
from __future__ import annotations

import importlib.metadata
import logging
import subprocess
import sys
import textwrap

import pytest

from kvport.platforms import (
    AttentionBackendError,
    DuplicateRegistrationError,
    Platform,
    PlatformSelectionError,
    PluginImportError,
    PluginRegistry,
    UnsupportedModelError,
    default_registry,
    import_object,
)
from plugin_fakes import REPO_ROOT, FakeDists, _isolated, fakes, platform_hook  # noqa: F401

# ---------------------------------------------------------------- discovery and selection


def test_real_entry_point_discovery_finds_and_selects_fake_plugin(fakes):
    module = fakes.add("alpha", platform_hook("alpha", "fakedev", priority=5))
    registry = PluginRegistry()   # plain importlib.metadata.entry_points(group="kvport")

    names = [reg.name for reg in registry.platforms()]
    assert "alpha" in names
    platform = registry.select_platform("fakedev")
    assert isinstance(platform, Platform)
    assert type(platform).__module__ == module
    origin = registry.origin(next(r for r in registry.platforms() if r.name == "alpha"))
    assert (origin.name, origin.dist_name, origin.dist_version) == \
        ("alpha", "kvport-fake-alpha", "1.0")
    # Priority 5 beats anything else installed here (a real CPU plugin has 100).
    assert type(registry.select_platform()).__module__ == module


def test_auto_select_follows_priority_and_skips_unavailable(fakes):
    fast = fakes.add("fast", platform_hook("fast", "fastdev", priority=10))
    slow = fakes.add("slow", platform_hook("slow", "slowcpu", priority=100))
    registry = fakes.registry()
    assert [r.name for r in registry.platforms()] == ["fast", "slow"]
    assert type(registry.select_platform()).__module__ == fast
    assert registry.select_platform() is registry.select_platform()   # instantiated once

    fakes.add("gone", platform_hook("gone", "gonedev", priority=1, available=False,
                                    reason="no gone hardware"))
    registry = fakes.registry()
    assert type(registry.select_platform()).__module__ == fast
    assert type(registry.select_platform("slowcpu")).__module__ == slow


def test_select_by_kvport_device_env(fakes, monkeypatch):
    fakes.add("fast", platform_hook("fast", "fastdev", priority=10))
    slow = fakes.add("slow", platform_hook("slow", "slowcpu", priority=100))
    monkeypatch.setenv("KVPORT_DEVICE", "slowcpu")
    registry = fakes.registry()
    assert type(registry.select_platform()).__module__ == slow


def test_nothing_available_lists_every_platform_and_reason(fakes):
    fakes.add("a", platform_hook("a", "adev", priority=10, available=False, reason="no A card"))
    fakes.add("b", platform_hook("b", "bdev", priority=20, available=False, reason="no B card"))
    with pytest.raises(PlatformSelectionError) as excinfo:
        fakes.registry().select_platform()
    message = str(excinfo.value)
    assert "no kvport platform is available here" in message
    assert "no A card" in message and "no B card" in message
    assert "kvport-fake-a" in message and "kvport-fake-b" in message


# ---------------------------------------------------------------- failures and messages


def test_missing_device_names_package_to_install(fakes):
    fakes.add("alpha", platform_hook("alpha", "fakedev"))
    registry = fakes.registry()
    with pytest.raises(PlatformSelectionError, match=r"pip install kvport-tpu"):
        registry.select_platform("tpu")
    with pytest.raises(PlatformSelectionError) as excinfo:
        registry.select_platform("quantum")
    assert "no kvport plugin provides device 'quantum'" in str(excinfo.value)
    assert "installed devices: fakedev" in str(excinfo.value)


def test_import_failure_is_recorded_logged_and_reported(fakes, caplog):
    fakes.add("broken", 'raise ImportError("boom")\n')
    good = fakes.add("good", platform_hook("good", "gooddev"))
    registry = fakes.registry()

    with caplog.at_level(logging.WARNING, logger="kvport.platforms.registry"):
        assert [r.name for r in registry.platforms()] == ["good"]
    assert type(registry.select_platform("gooddev")).__module__ == good

    [failure] = registry.load_failures
    assert (failure.name, failure.dist_name, failure.dist_version) == \
        ("broken", "kvport-fake-broken", "1.0")
    assert "Traceback" in failure.traceback_text and "ImportError: boom" in failure.traceback_text
    assert "ImportError: boom" in caplog.text and "Traceback" in caplog.text

    with pytest.raises(PlatformSelectionError) as excinfo:
        registry.select_platform("tpu")
    message = str(excinfo.value)
    assert "pip install kvport-tpu" in message
    assert "kvport-fake-broken" in message and "ImportError: boom" in message
    assert "Traceback" in message


def test_raising_hook_is_recorded_and_its_registrations_dropped(fakes):
    fakes.add("halfway", platform_hook("halfway", "halfdev") + '''
@hookimpl
def kvport_register_models(register):
    raise RuntimeError("model table corrupt")
''')
    fakes.add("good", platform_hook("good", "gooddev"))
    registry = fakes.registry()
    assert [r.name for r in registry.platforms()] == ["good"]
    [failure] = registry.load_failures
    assert failure.name == "halfway" and "model table corrupt" in failure.traceback_text


def test_present_but_unavailable_gives_plugin_reason(fakes):
    fakes.add("accel", platform_hook("accel", "acceldev", available=False,
                                     reason="no accelerator found (driver not loaded)"))
    fakes.add("cpuish", platform_hook("cpuish", "cpuish", priority=100))
    with pytest.raises(PlatformSelectionError) as excinfo:
        fakes.registry().select_platform("acceldev")
    message = str(excinfo.value)
    assert ("device 'acceldev' is provided by kvport-fake-accel but is not available here: "
            "no accelerator found (driver not loaded)") in message
    assert "cpuish" in message   # what is available instead


def test_is_available_raising_counts_as_unavailable_plugin_bug(fakes, caplog):
    fakes.add("flaky", '''
def _check():
    raise RuntimeError("driver exploded")
''' + platform_hook("flaky", "flakydev", check="_check"))
    registry = fakes.registry()
    with caplog.at_level(logging.WARNING, logger="kvport.platforms.registry"):
        with pytest.raises(PlatformSelectionError) as excinfo:
            registry.select_platform("flakydev")
    message = str(excinfo.value)
    assert "availability check raised: RuntimeError: driver exploded" in message
    assert "bug in kvport-fake-flaky" in message
    assert "Traceback" in caplog.text and "driver exploded" in caplog.text
    [reg] = registry.platforms()
    assert registry.availability(reg)[0] is False


def test_platform_class_import_failure_is_chained_with_traceback(fakes):
    fakes.add("ghost", platform_hook("ghost", "ghostdev",
                                     platform_class='"kvfake_no_such_module_xyz:Nope"'))
    with pytest.raises(PlatformSelectionError) as excinfo:
        fakes.registry().select_platform("ghostdev")
    assert "ModuleNotFoundError" in str(excinfo.value)
    assert "kvport-fake-ghost" in str(excinfo.value)
    assert isinstance(excinfo.value.__cause__, ModuleNotFoundError)


def test_allow_list_env_excludes_plugin_and_says_so(fakes, monkeypatch):
    fakes.add("alpha", platform_hook("alpha", "alphadev"))
    fakes.add("beta", platform_hook("beta", "betadev"))
    monkeypatch.setenv("KVPORT_PLUGINS", "alpha")
    registry = fakes.registry()

    assert [r.name for r in registry.platforms()] == ["alpha"]
    assert fakes.modules["beta"] not in sys.modules            # never imported
    assert [p.name for p in registry.excluded_plugins] == ["beta"]
    assert "builtin" in [p.name for p in registry.plugins()]   # builtin always loads
    with pytest.raises(PlatformSelectionError) as excinfo:
        registry.select_platform("betadev")
    assert "entry point 'beta'" in str(excinfo.value)
    assert "is installed but not in KVPORT_PLUGINS=alpha" in str(excinfo.value)


def test_installed_but_excluded_or_broken_device_package_is_not_told_to_install(
        fakes, monkeypatch):
    fakes.add("alpha", platform_hook("alpha", "alphadev"))
    fakes.add("tpu", platform_hook("tpu", "tpu"), dist_name="kvport-tpu")
    monkeypatch.setenv("KVPORT_PLUGINS", "alpha")
    with pytest.raises(PlatformSelectionError) as excinfo:
        fakes.registry().select_platform("tpu")
    assert ("kvport-tpu is installed, but its entry point 'tpu' is not in KVPORT_PLUGINS=alpha"
            in str(excinfo.value))

    monkeypatch.delenv("KVPORT_PLUGINS")
    fakes.add("neuron", 'raise ImportError("no libnrt")\n', dist_name="kvport-neuron")
    with pytest.raises(PlatformSelectionError) as excinfo:
        fakes.registry().select_platform("neuron")
    assert "kvport-neuron is installed but failed to load" in str(excinfo.value)
    assert "ImportError: no libnrt" in str(excinfo.value)


def test_allow_list_with_real_discovery(fakes):
    module = fakes.add("alpha", platform_hook("alpha", "alphadev"))
    registry = PluginRegistry(allow_list=["alpha"])
    assert [r.name for r in registry.platforms()] == ["alpha"]
    assert type(registry.select_platform()).__module__ == module


def test_duplicate_platform_names_name_both_plugins(fakes):
    fakes.add("one", platform_hook("dup", "dupdev"))
    fakes.add("two", platform_hook("dup", "dupdev"))
    registry = fakes.registry()
    with pytest.raises(DuplicateRegistrationError) as excinfo:
        registry.platforms()
    message = str(excinfo.value)
    assert "platform 'dup'" in message
    assert "kvport-fake-one" in message and "kvport-fake-two" in message
    with pytest.raises(DuplicateRegistrationError):   # stays broken, no half-loaded registry
        registry.load()


def test_duplicate_attention_backend_names_name_both_plugins(fakes):
    hook = '''
@hookimpl
def kvport_register_attention_backends(register):
    register(name="torch_reference", backend_class="x:Y")
'''
    fakes.add("copycat", hook)
    with pytest.raises(DuplicateRegistrationError) as excinfo:
        fakes.registry().attention_backends()
    assert "attention backend 'torch_reference'" in str(excinfo.value)
    assert "plugin 'builtin'" in str(excinfo.value)
    assert "kvport-fake-copycat" in str(excinfo.value)


def test_loading_is_lazy_and_idempotent(fakes):
    fakes.add("alpha", platform_hook("alpha", "alphadev"))
    registry = fakes.registry()
    assert fakes.modules["alpha"] not in sys.modules   # nothing loaded before a query
    registry.load()
    registry.load()
    registry.platforms()
    registry.select_platform("alphadev")
    registry.models()
    assert fakes.module("alpha").CALLS == ["platforms"]


# ---------------------------------------------------------------- attention backends and models


def test_attention_backends(fakes):
    fakes.add("attn", '''
from kvport.attention_backends.interface import AttentionBackend


class FakeBackend(AttentionBackend):
    name = "fake_attn"

    @staticmethod
    def kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size):
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    def build_metadata(self, common, device):
        return common

    def forward(self, query, key, value, kv_cache, metadata):
        return query


@hookimpl
def kvport_register_attention_backends(register):
    register(name="fake_attn", backend_class=__name__ + ":FakeBackend", device_types=("fakedev",))
''')
    registry = fakes.registry()
    assert {r.name for r in registry.attention_backends()} == {"torch_reference", "fake_attn"}
    assert [r.name for r in registry.attention_backends("cpu")] == ["torch_reference"]
    assert registry.attention_backend_class("fake_attn", "fakedev").name == "fake_attn"

    with pytest.raises(AttentionBackendError) as excinfo:
        registry.attention_backend_class("flash_nope", "fakedev")
    assert "unknown attention backend 'flash_nope'" in str(excinfo.value)
    assert "torch_reference" in str(excinfo.value) and "fake_attn" in str(excinfo.value)

    with pytest.raises(AttentionBackendError) as excinfo:
        registry.attention_backend_class("fake_attn", "cpu")
    assert "runs on fakedev, not on 'cpu'" in str(excinfo.value)
    assert "torch_reference" in str(excinfo.value)


def test_models_builtin_unsupported_and_override(fakes):
    fakes.add("tuned", '''
class TunedLlama:
    pass


@hookimpl
def kvport_register_models(register):
    register(architecture="LlamaForCausalLM", model_class=__name__ + ":TunedLlama")
''')
    registry = fakes.registry()
    archs = {r.architecture: r for r in registry.models()}
    assert set(archs) == {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                          "Qwen3ForCausalLM"}
    assert registry.origin(archs["LlamaForCausalLM"]).name == "tuned"      # later plugin wins
    assert registry.origin(archs["Qwen2ForCausalLM"]).name == "builtin"
    assert registry.model_class("LlamaForCausalLM").__name__ == "TunedLlama"

    with pytest.raises(UnsupportedModelError) as excinfo:
        registry.model_class("GPTNeoXForCausalLM")
    message = str(excinfo.value)
    assert "'GPTNeoXForCausalLM' is not supported" in message
    assert "LlamaForCausalLM" in message and "Qwen3ForCausalLM" in message

    with pytest.raises(UnsupportedModelError, match="supported architectures: none"):
        registry.model_class("LlamaForCausalLM", framework="jax")


def test_registered_class_import_failure_names_plugin(fakes):
    fakes.add("badmodel", '''
@hookimpl
def kvport_register_models(register):
    register(architecture="BadForCausalLM", model_class="kvfake_missing_module_q:Bad")
''')
    with pytest.raises(PluginImportError) as excinfo:
        fakes.registry().model_class("BadForCausalLM")
    assert "kvport-fake-badmodel" in str(excinfo.value)
    assert "ModuleNotFoundError" in str(excinfo.value)


def test_registration_imports_no_framework_or_model_code():
    # A fresh interpreter, so modules imported by other tests cannot hide an import.
    code = textwrap.dedent('''
        import sys
        from kvport.platforms import PluginRegistry
        registry = PluginRegistry(entry_points=[])
        registry.load()
        assert registry.models() and registry.attention_backends()
        loaded = [m for m in sys.modules if m in ("torch", "jax")
                  or m.startswith(("kvport.models.", "kvport.attention_backends.torch"))]
        assert not loaded, loaded
    ''')
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- helpers


def test_import_object_forms():
    import os.path
    assert import_object("os.path:join") is os.path.join
    assert import_object("os.path.join") is os.path.join
    assert import_object("os:path.join") is os.path.join
    with pytest.raises(ValueError):
        import_object("nodots")
    with pytest.raises(ImportError, match="cannot import name 'nope'"):
        import_object("os.path:nope")


def test_default_registry_is_cached():
    default_registry.cache_clear()
    try:
        assert default_registry() is default_registry()
    finally:
        default_registry.cache_clear()
