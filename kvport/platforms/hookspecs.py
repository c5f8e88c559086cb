"""Every pluggy hook a kvport plugin may implement.

A plugin is a module (or object) exposed under the entry-point group ``kvport``::

    [project.entry-points.kvport]
    mydevice = "kvport_mydevice.plugin"

and implementing any of the hooks below with ``@kvport.hookimpl``. Each hook is called once,
when the registry first loads plugins, and receives a ``register`` callback; the plugin calls
it once per thing it provides. Registration must stay cheap: names, a never-raising
availability check and dotted import paths. Heavy libraries (torch.cuda, triton, jax,
habana_frameworks, torch_neuronx) are imported only after a platform is selected.

Dispatch: every hook is a plain broadcast (all implementations run; return values are
ignored). Hooks only ever gain arguments: an implementation may accept any subset of the
arguments documented here (pluggy passes only what it names), so old plugins keep working.
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
        hpu 40, neuron 50, mps 60, xla 90, cpu 100 (always last).
    """
    name: str
    device_type: str
    platform_class: str
    is_available: Callable[[], tuple[bool, str]]
    priority: int = 50


@dataclass(frozen=True)
class AttentionBackendRegistration:
    """An attention backend. ``device_types`` lists the devices it runs on (empty: any)."""
    name: str
    backend_class: str
    device_types: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelRegistration:
    """A model family implementation for one Hugging Face architecture name and framework."""
    architecture: str
    model_class: str
    framework: str = "torch"


class RegisterPlatform(Protocol):
    def __call__(self, name: str, device_type: str, platform_class: str,
                 is_available: Callable[[], tuple[bool, str]], priority: int = 50) -> None: ...


class RegisterAttentionBackend(Protocol):
    def __call__(self, name: str, backend_class: str,
                 device_types: tuple[str, ...] = ()) -> None: ...


class RegisterModel(Protocol):
    def __call__(self, architecture: str, model_class: str, framework: str = "torch") -> None: ...


@hookspec
def kvport_register_platforms(register: RegisterPlatform) -> None:
    """Register the platforms this plugin provides.

    Call ``register(name=..., device_type=..., platform_class="pkg.mod:Class",
    is_available=fn, priority=N)`` once per platform. Registering a name twice is an error.

    Example::

        @kvport.hookimpl
        def kvport_register_platforms(register):
            register(name="cpu", device_type="cpu", platform_class="kvport_cpu.platform:CpuPlatform",
                     is_available=lambda: (True, ""), priority=100)
    """


@hookspec
def kvport_register_attention_backends(register: RegisterAttentionBackend) -> None:
    """Register attention backends.

    Call ``register(name=..., backend_class="pkg.mod:Class", device_types=("cpu",))``. The
    class must subclass ``kvport.attention_backends.interface.AttentionBackend``. Users pick
    one by name with ``attention_backend=...``; otherwise the platform's
    ``default_attention_backend`` decides.
    """


@hookspec
def kvport_register_models(register: RegisterModel) -> None:
    """Register model implementations by Hugging Face architecture name.

    Call ``register(architecture="LlamaForCausalLM", model_class="pkg.mod:Class",
    framework="torch")``. A plugin's registration for an architecture and framework that is
    already registered replaces the earlier one (later plugins win), so a plugin can ship a
    device-tuned model.
    """
