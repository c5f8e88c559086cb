"""The Platform contract (kvport/platforms/interface.py), framework-free."""
from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest

from kvport.core.config import ConfigError, EngineConfig

__all__ = ["test_is_available_never_raises_and_explains_itself",
           "test_registration_and_availability_import_no_device_runtime",
           "test_platform_attributes_match_registration", "test_memory_queries",
           "test_supported_and_default_dtypes", "test_distributed_backend",
           "test_default_attention_backend_is_usable_on_the_device",
           "test_worker_class_is_a_worker", "test_registered_framework_matches_the_worker",
           "test_check_and_update_config_accepts_defaults_and_is_idempotent",
           "test_check_and_update_config_rejects_unsupported_dtypes"]

KNOWN_DTYPES = ("float32", "bfloat16", "float16")
# Modules whose import means a device runtime was loaded during registration.
HEAVY_MODULES = ("torch", "jax", "jaxlib", "triton", "tensorflow", "habana_frameworks",
                 "torch_neuronx", "torch_xla", "intel_extension_for_pytorch")


def test_is_available_never_raises_and_explains_itself(kit_target):
    reg = kit_target.registration
    for attempt in range(3):   # cheap and repeatable: the registry may call it any time
        try:
            result = reg.is_available()
        except Exception as exc:
            pytest.fail(f"is_available of platform {reg.name!r} raised {type(exc).__name__}: "
                        f"{exc}; it must return (bool, reason) and never raise")
        assert (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], bool)
                and isinstance(result[1], str)), (
            f"is_available of platform {reg.name!r} returned {result!r}; it must return a "
            "(bool, reason string) tuple")
        assert result[0], (f"platform {reg.name!r} says it is unavailable ({result[1]!r}) "
                           "although it was selected")


def test_registration_and_availability_import_no_device_runtime(kit_target):
    """Registration and is_available run for every kvport command, on every machine: they
    must not import the framework or its device runtime (a fresh interpreter checks)."""
    plugin = kit_target.registry.origin(kit_target.registration).name
    code = textwrap.dedent(f"""
        import sys
        from kvport.platforms import PluginRegistry
        registry = PluginRegistry(allow_list=[{plugin!r}])   # this plugin (and the builtin)
        reg = next(r for r in registry.platforms() if r.name == {kit_target.name!r})
        registry.availability(reg)
        print(",".join(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"loading the registry failed:\n{result.stderr}"
    heavy = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert not heavy, (
        f"loading the plugins and calling is_available of platform {kit_target.name!r} "
        f"imported {heavy}: registration must only name dotted paths, and is_available must "
        "check cheaply (find_spec, a device file, an environment variable); import the "
        "framework in the Platform class, which is imported only once it is selected")


def test_platform_attributes_match_registration(kit_target):
    platform, reg = kit_target.platform, kit_target.registration
    assert platform.device_type == reg.device_type, (
        f"{type(platform).__name__}.device_type is {platform.device_type!r} but the platform "
        f"was registered with device_type {reg.device_type!r}")
    assert platform.name == reg.name, (
        f"{type(platform).__name__}.name is {platform.name!r} but the platform was registered "
        f"as {reg.name!r}")


def test_memory_queries(kit_target):
    platform = kit_target.platform
    total, free = platform.total_memory_bytes(), platform.free_memory_bytes()
    for what, value in (("total_memory_bytes", total), ("free_memory_bytes", free)):
        assert isinstance(value, int) and not isinstance(value, bool), (
            f"{what}() returned {value!r} ({type(value).__name__}); it must return an int")
        assert value > 0, f"{what}() returned {value}; the KV cache is sized from it"
    assert free <= total, f"free_memory_bytes() {free} exceeds total_memory_bytes() {total}"


def test_supported_and_default_dtypes(kit_target):
    platform = kit_target.platform
    dtypes = platform.supported_dtypes()
    assert isinstance(dtypes, tuple) and dtypes, (
        f"supported_dtypes() returned {dtypes!r}; it must be a non-empty tuple, best first")
    unknown = [d for d in dtypes if d not in KNOWN_DTYPES]
    assert not unknown, f"supported_dtypes() names {unknown}; kvport knows {KNOWN_DTYPES}"
    for checkpoint in KNOWN_DTYPES:
        chosen = platform.default_dtype(checkpoint)
        assert chosen in dtypes, (
            f"default_dtype({checkpoint!r}) returned {chosen!r}, which is not in "
            f"supported_dtypes() {dtypes}")


def test_distributed_backend(kit_target):
    name = kit_target.platform.distributed_backend()
    assert isinstance(name, str) and name.strip(), (
        f"distributed_backend() returned {name!r}; it must name a collective backend "
        "(nccl, gloo, hccl, xla, ...)")


def test_default_attention_backend_is_usable_on_the_device(kit_target):
    config = EngineConfig.from_kwargs(device=kit_target.name)
    kit_target.platform.check_and_update_config(config)
    name = kit_target.platform.default_attention_backend(config)
    usable = [reg.name for reg in kit_target.attention_backends()]
    assert name in usable, (
        f"default_attention_backend() returned {name!r}, which is not registered for device "
        f"{kit_target.registration.device_type!r}; registered there: {usable}")
    kit_target.registry.attention_backend_class(name, kit_target.registration.device_type)


def test_worker_class_is_a_worker(kit_target):
    from kvport.core.worker import Worker
    from kvport.platforms import import_object

    path = kit_target.platform.worker_class()
    cls = import_object(path)
    assert isinstance(cls, type) and issubclass(cls, Worker), (
        f"worker_class() returned {path!r}, which is not a subclass of kvport.core.worker.Worker")


def test_registered_framework_matches_the_worker(kit_target):
    """A platform registered as torch (the default) must have a torch worker, which the
    kit's torch checks ask for its device; otherwise it must say which framework it uses."""
    if kit_target.framework != "torch":
        pytest.skip(f"a {kit_target.framework} platform")
    from kvport.testing.target import framework_mismatch
    try:
        kit_target.torch_device()
    except TypeError as exc:
        if str(exc) != framework_mismatch(kit_target):
            raise
        pytest.fail(str(exc), pytrace=False)


def test_check_and_update_config_accepts_defaults_and_is_idempotent(kit_target):
    platform = kit_target.platform
    config = EngineConfig.from_kwargs(device=kit_target.name)
    platform.check_and_update_config(config)
    config.validate()   # what the platform set must still be a valid configuration
    once = copy.deepcopy(config)
    platform.check_and_update_config(config)
    assert config == once, (
        "check_and_update_config is not idempotent: a second call changed the config from "
        f"{once} to {config}")
    for dtype in platform.supported_dtypes():
        explicit = EngineConfig.from_kwargs(device=kit_target.name, dtype=dtype)
        platform.check_and_update_config(explicit)
        assert explicit.model.dtype == dtype, (
            f"check_and_update_config changed an explicit, supported dtype {dtype!r} to "
            f"{explicit.model.dtype!r}")


def test_check_and_update_config_rejects_unsupported_dtypes(kit_target):
    platform = kit_target.platform
    unsupported = [d for d in KNOWN_DTYPES if d not in platform.supported_dtypes()]
    if not unsupported:
        pytest.skip("the platform supports every dtype kvport knows")
    for dtype in unsupported:
        config = EngineConfig.from_kwargs(device=kit_target.name, dtype=dtype)
        with pytest.raises(ConfigError):
            platform.check_and_update_config(config)
