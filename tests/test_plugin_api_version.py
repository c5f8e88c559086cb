"""The versioned plugin API: every plugin declares KVPORT_PLUGIN_API; the registry refuses one
whose range excludes this kvport's PLUGIN_API_VERSION (or that declares none) with a message
naming both versions and what to install, and loads every other plugin as before."""
from __future__ import annotations

import logging

import pytest

import kvport
from kvport.platforms import (
    PLUGIN_API_VERSION,
    RECOMMENDED_RANGE,
    PlatformSelectionError,
    PluginRegistry,
)
from kvport.platforms.api_version import incompatibility_advice, supports
from plugin_fakes import FakeDists, _isolated, fakes, platform_hook  # noqa: F401

HEADER = '''
from kvport.platforms.hookspecs import hookimpl
from kvport.platforms.interface import Platform
{declaration}

CALLS = []


class FakePlatform(Platform):
    total_memory_bytes = free_memory_bytes = lambda self: 1 << 30
    supported_dtypes = lambda self: ("float32",)
    default_dtype = lambda self, checkpoint_dtype: "float32"
    distributed_backend = lambda self: "gloo"
    default_attention_backend = lambda self, config: "torch_reference"
    worker_class = lambda self: "kvport.torch_worker.worker:TorchWorker"
'''


def add_plugin(fakes: FakeDists, name: str, declaration: str, hook: str | None = None) -> str:
    return fakes.add(name, hook or platform_hook(name, f"{name}dev"),
                     header=HEADER.format(declaration=declaration))


def test_core_exposes_its_version_and_recommended_range():
    assert kvport.PLUGIN_API_VERSION == PLUGIN_API_VERSION == "1.0"
    assert RECOMMENDED_RANGE == ">=1.0,<2"
    assert supports(RECOMMENDED_RANGE)


def test_plugin_for_newer_api_is_refused_naming_both_versions_and_the_upgrade(fakes, caplog):
    add_plugin(fakes, "future", 'KVPORT_PLUGIN_API = ">=2.0,<3"')
    add_plugin(fakes, "today", 'KVPORT_PLUGIN_API = ">=1.0,<2"')
    registry = fakes.registry()
    with caplog.at_level(logging.WARNING, logger="kvport.platforms.registry"):
        [refusal] = registry.refused_plugins
    assert refusal.info.dist_name == "kvport-fake-future"
    assert refusal.declared == ">=2.0,<3"
    message = refusal.message
    assert ">=2.0,<3" in message and "provides plugin API 1.0" in message
    assert "pip install -U kvport`" in message
    assert "release of kvport-fake-future that supports plugin API 1.0" in message
    assert "kvport-fake-future" in caplog.text and "refuses" in caplog.text
    # Nothing it registers exists; the compatible plugin is untouched.
    assert [p.name for p in registry.platforms()] == ["today"]
    with pytest.raises(PlatformSelectionError) as excinfo:
        registry.select_platform("futuredev")
    assert message in str(excinfo.value)


def test_plugin_for_older_api_is_told_to_upgrade_the_plugin(fakes):
    add_plugin(fakes, "old", 'KVPORT_PLUGIN_API = ">=0.3,<1"')
    [refusal] = fakes.registry().refused_plugins
    assert "supports plugin API >=0.3,<1" in refusal.message
    assert "provides plugin API 1.0" in refusal.message
    assert "`pip install -U kvport-fake-old`" in refusal.message


def test_plugin_declaring_nothing_is_refused_with_the_line_to_add(fakes):
    module = add_plugin(fakes, "silent", "")
    [refusal] = fakes.registry().refused_plugins
    assert refusal.declared is None
    assert f"{module} must set KVPORT_PLUGIN_API = '>=1.0,<2'" in refusal.message


@pytest.mark.parametrize("declared", ["'one point oh'", "2", "['>=1.0']"])
def test_invalid_declaration_is_refused_as_a_plugin_bug(fakes, declared):
    add_plugin(fakes, "odd", f"KVPORT_PLUGIN_API = {declared}")
    [refusal] = fakes.registry().refused_plugins
    assert "invalid plugin API range" in refusal.message
    assert "kvport-fake-odd" in refusal.message


def test_empty_range_is_reported_as_such():
    advice = incompatibility_advice(">=1.5,<1.2", "kvport-x")
    assert "contains no plugin API version" in advice


@pytest.mark.parametrize("declared", [">=1.0,<2", "~=1.0", ">=1", "==1.*", ">=0.9,<1.1"])
def test_compatible_declarations_load_and_are_recorded(fakes, declared):
    add_plugin(fakes, "fine", f"KVPORT_PLUGIN_API = {declared!r}")
    registry = fakes.registry()
    assert not registry.refused_plugins and not registry.load_failures
    [platform] = registry.platforms()
    assert registry.origin(platform).api_range == declared


def test_version_is_checked_before_pluggy_sees_hooks_with_future_arguments(fakes):
    """A plugin for a newer API may take hook arguments this kvport does not pass: pluggy
    would reject it with a signature error; the user must get the version message instead."""
    add_plugin(fakes, "newhook", 'KVPORT_PLUGIN_API = ">=1.4,<2"', hook='''
@hookimpl
def kvport_register_platforms(register, register_quantization):
    register(name="newhook", device_type="x", platform_class="m:C",
             is_available=lambda: (True, ""))
''')
    registry = fakes.registry()
    assert not registry.load_failures
    [refusal] = registry.refused_plugins
    assert "supports plugin API >=1.4,<2" in refusal.message
    assert "pip install -U kvport`" in refusal.message


def test_hooks_only_gain_arguments_old_register_calls_keep_working(fakes):
    """`framework` was added to the register callbacks with a default: a plugin that does
    not pass it (written against the first 1.0 hooks) still registers, as torch."""
    add_plugin(fakes, "plain", 'KVPORT_PLUGIN_API = ">=1.0,<2"', hook='''
@hookimpl
def kvport_register_platforms(register):
    register("plain", "plaindev", __name__ + ":FakePlatform", lambda: (True, ""), 5)

@hookimpl
def kvport_register_attention_backends(register):
    register("plain_attn", "kvport.attention_backends.torch_reference:TorchReferenceBackend",
             ("plaindev",))
''')
    registry = fakes.registry()
    [platform] = registry.platforms()
    assert (platform.name, platform.priority, platform.framework) == ("plain", 5, "torch")
    backend = next(b for b in registry.attention_backends("plaindev") if b.name == "plain_attn")
    assert backend.framework == "torch"


def test_framework_must_be_a_name(fakes):
    add_plugin(fakes, "nofw", 'KVPORT_PLUGIN_API = ">=1.0,<2"', hook='''
@hookimpl
def kvport_register_attention_backends(register):
    register(name="nofw_attn", backend_class="m:C", framework="")
''')
    [failure] = fakes.registry().load_failures
    assert "framework must be a non-empty string" in failure.traceback_text


def test_builtin_and_cpu_plugins_declare_a_compatible_range():
    registry = PluginRegistry()
    ranges = {p.name: p.api_range for p in registry.plugins()}
    assert ranges["builtin"] == RECOMMENDED_RANGE
    assert ranges["cpu"] is not None and supports(ranges["cpu"])
    assert not registry.refused_plugins
