"""Every pluggy hook a kvport plugin may implement.

A plugin is a module (or object) exposed under the entry-point group ``kvport``::

    [project.entry-points.kvport]
    mydevice = "kvport_mydevice.plugin"

declaring the plugin API versions it supports (see ``kvport.platforms.api_version``)::

    KVPORT_PLUGIN_API = ">=1.0,<2"

and implementing any of the hooks below with ``@kvport.hookimpl``. Each hook is called once,
when the registry first loads plugins, and receives a ``register`` callback; the plugin calls
it once per thing it provides. Registration must stay cheap: names, a never-raising
availability check and dotted import paths. Heavy libraries (torch.cuda, triton, jax,
habana_frameworks, torch_neuronx) are imported only after a platform is selected.

Dispatch: every hook is a plain broadcast (all implementations run; return values are
ignored). Hooks only ever gain arguments, and so do the ``register`` callbacks (new ones
always with defaults): an implementation may accept any subset of the arguments documented
here (pluggy passes only what it names), so old plugins keep working. Anything else is a
major plugin API version bump. docs/plugins.md documents every hook; a test fails when one
is missing there.
The built-in pieces of kvport register through these same hooks (``kvport/builtin_plugin.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import pluggy

PROJECT_NAME = "kvport"
ENTRY_POINT_GROUP = "kvport"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@dataclass(frozen=True)
class PlatformRegistration:
    """A platform a plugin provides.

    name: unique plugin-facing name ("cpu", "cuda").
    device_type: what ``--device`` / ``KVPORT_DEVICE`` selects it by.
    platform_class: dotted path "module:Class" of the Platform subclass; imported on selection.
    is_available: cheap check returning (available, reason); must never raise and must not
        import the framework's device runtime. The reason is shown when it is unavailable.
    priority: auto-selection order, lower first. Built-in values: cuda 10, rocm 20, tpu 30,
        hpu 40, neuron 50, mps 60, cpu 100; xla 110 (after the CPU: JAX's CPU or GPU
        backend is chosen only by name, `--device xla`).
    framework: what its Worker computes with ("torch", "jax", ...). The conformance kit runs
        its torch-based checks only on torch platforms (plugin API 1.0).
    """
    name: str
    device_type: str
    platform_class: str
    is_available: Callable[[], tuple[bool, str]]
    priority: int = 50
    framework: str = "torch"


@dataclass(frozen=True)
class AttentionBackendRegistration:
    """An attention backend. ``device_types`` lists the devices it runs on (empty: any);
    ``framework`` is the array library its forward takes ("torch", "jax", ...)."""
    name: str
    backend_class: str
    device_types: tuple[str, ...] = ()
    framework: str = "torch"


@dataclass(frozen=True)
class ModelRegistration:
    """A model family implementation for one Hugging Face architecture name and framework."""
    architecture: str
    model_class: str
    framework: str = "torch"


class RegisterPlatform(Protocol):
    def __call__(self, name: str, device_type: str, platform_class: str,
                 is_available: Callable[[], tuple[bool, str]], priority: int = 50,
                 framework: str = "torch") -> None: ...


class RegisterAttentionBackend(Protocol):
    def __call__(self, name: str, backend_class: str, device_types: tuple[str, ...] = (),
                 framework: str = "torch") -> None: ...


class RegisterModel(Protocol):
    def __call__(self, architecture: str, model_class: str, framework: str = "torch") -> None: ...


@hookspec
def kvport_register_platforms(register: RegisterPlatform) -> None:
    """Register the platforms this plugin provides.

    Call ``register(name=..., device_type=..., platform_class="pkg.mod:Class",
    is_available=fn, priority=N, framework="torch")`` once per platform. Registering a name
    twice is an error. ``is_available`` must return (bool, reason), never raise, and import
    no device runtime; the Platform class is imported only when the platform is selected.

    Example::

        @kvport.hookimpl
        def kvport_register_platforms(register):
            register(name="cpu", device_type="cpu", platform_class="kvport_cpu.platform:CpuPlatform",
                     is_available=lambda: (True, ""), priority=100)
    """


@hookspec
def kvport_register_attention_backends(register: RegisterAttentionBackend) -> None:
    """Register attention backends.

    Call ``register(name=..., backend_class="pkg.mod:Class", device_types=("cpu",),
    framework="torch")``. The class must subclass
    ``kvport.attention_backends.interface.AttentionBackend``. Users pick one by name with
    ``--attention-backend`` / ``attention_backend=...``; otherwise the platform's
    ``default_attention_backend`` decides. A plugin may register backends for a device another
    plugin provides (e.g. an alternative CPU kernel).

    Example::

        @kvport.hookimpl
        def kvport_register_attention_backends(register):
            register(name="cpu_sdpa", backend_class="kvport_sdpa_example.attention:SdpaBackend",
                     device_types=("cpu",))
    """


@hookspec
def kvport_register_models(register: RegisterModel) -> None:
    """Register model implementations by Hugging Face architecture name.

    Call ``register(architecture="LlamaForCausalLM", model_class="pkg.mod:Class",
    framework="torch")``. A plugin's registration for an architecture and framework that is
    already registered replaces the earlier one (later plugins win, in entry-point-name order
    after the built-in plugin), so a plugin can ship a device-tuned model.

    Example::

        @kvport.hookimpl
        def kvport_register_models(register):
            register(architecture="LlamaForCausalLM",
                     model_class="kvport_mydevice.llama:TunedLlama", framework="torch")
    """
