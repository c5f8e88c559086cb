"""Plain records the registry keeps about plugins, and the `register(...)` callbacks.

Nothing here imports a framework: registrations hold dotted paths, imported on demand by
`import_object`.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass, field
from typing import Any, Callable

from kvport.platforms.hookspecs import (
    PROJECT_NAME,
    AttentionBackendRegistration,
    ModelRegistration,
    PlatformRegistration,
)

BUILTIN_PLUGIN_NAME = "builtin"
BUILTIN_PLUGIN_MODULE = "kvport.builtin_plugin"


@dataclass(frozen=True)
class PluginInfo:
    """Where a plugin came from: its entry-point name and its distribution, when known.

    module: the entry point's target ("kvport_cpu.plugin"), where its declarations live.
    api_range: the plugin API range it declares (KVPORT_PLUGIN_API), once read.
    """
    name: str
    dist_name: str | None = None
    dist_version: str | None = None
    module: str | None = None
    api_range: str | None = field(default=None, compare=False)

    @property
    def package(self) -> str:
        """What a user would pip install / uninstall: the distribution, else the entry point."""
        return self.dist_name or f"plugin '{self.name}'"

    def describe(self) -> str:
        """Human-readable origin, e.g. "plugin 'cuda' (kvport-cuda 1.2.0)"."""
        if self.dist_name is None:
            return f"plugin '{self.name}'"
        version = f" {self.dist_version}" if self.dist_version else ""
        return f"plugin '{self.name}' ({self.dist_name}{version})"


@dataclass(frozen=True)
class PluginLoadFailure:
    """A plugin that failed to import or to register; `traceback_text` is the full traceback."""
    name: str
    dist_name: str | None
    dist_version: str | None
    traceback_text: str

    @property
    def info(self) -> PluginInfo:
        return PluginInfo(self.name, self.dist_name, self.dist_version)


@dataclass(frozen=True)
class PluginRefusal:
    """A plugin that imported but was not registered: its declared plugin API range (None when
    it declares none) does not include this kvport's. `message` says what to install."""
    info: PluginInfo
    declared: str | None
    message: str


def plugin_info(ep: importlib.metadata.EntryPoint) -> PluginInfo:
    """The PluginInfo of an entry point (distribution unknown for hand-made EntryPoints)."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return PluginInfo(ep.name, module=ep.value)
    return PluginInfo(ep.name, dist.metadata["Name"], dist.version, module=ep.value)


def builtin_info() -> PluginInfo:
    return PluginInfo(BUILTIN_PLUGIN_NAME, PROJECT_NAME, kvport_version(),
                      module=BUILTIN_PLUGIN_MODULE)


def kvport_version() -> str | None:
    """The installed kvport's version (None when running from an uninstalled checkout)."""
    try:
        return importlib.metadata.version(PROJECT_NAME)
    except importlib.metadata.PackageNotFoundError:
        return None


def import_object(dotted: str) -> Any:
    """Import "package.module:attr" (attr may be dotted) or "package.module.attr"."""
    if not isinstance(dotted, str) or not dotted.strip():
        raise ValueError(f"expected an import path like 'package.module:attr', got {dotted!r}")
    if ":" in dotted:
        module_name, _, attr_path = dotted.partition(":")
    else:
        module_name, _, attr_path = dotted.rpartition(".")
    if not module_name or not attr_path:
        raise ValueError(f"{dotted!r} is not an import path of the form 'package.module:attr'")
    obj: Any = importlib.import_module(module_name)
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportError(f"cannot import name {attr_path!r} from {module_name!r}",
                              name=module_name) from None
    return obj


def _check_framework(what: str, framework: str) -> str:
    if not isinstance(framework, str) or not framework.strip():
        raise TypeError(f"{what}: framework must be a non-empty string such as 'torch' or "
                        f"'jax', got {framework!r}")
    return framework.strip()


@dataclass
class Staged:
    """What one plugin registered, held back until all its hooks have run without raising.

    Its `register_*` methods are the `register(...)` callbacks the hooks receive; their
    signatures are the ones hookspecs.Register* document (only ever gaining arguments).
    """
    platforms: list[PlatformRegistration] = field(default_factory=list)
    attention_backends: list[AttentionBackendRegistration] = field(default_factory=list)
    models: list[ModelRegistration] = field(default_factory=list)

    def register_platform(self, name: str, device_type: str, platform_class: str,
                          is_available: Callable[[], tuple[bool, str]],
                          priority: int = 50, framework: str = "torch") -> None:
        if not callable(is_available):
            raise TypeError(f"platform {name!r}: is_available must be a callable returning "
                            f"(bool, reason), got {is_available!r}")
        self.platforms.append(PlatformRegistration(
            name=name, device_type=device_type, platform_class=platform_class,
            is_available=is_available, priority=int(priority),
            framework=_check_framework(f"platform {name!r}", framework)))

    def register_attention_backend(self, name: str, backend_class: str,
                                   device_types: tuple[str, ...] = (),
                                   framework: str = "torch") -> None:
        if isinstance(device_types, str):   # a common slip: ("cuda") instead of ("cuda",)
            device_types = (device_types,)
        self.attention_backends.append(AttentionBackendRegistration(
            name=name, backend_class=backend_class, device_types=tuple(device_types),
            framework=_check_framework(f"attention backend {name!r}", framework)))

    def register_model(self, architecture: str, model_class: str,
                       framework: str = "torch") -> None:
        self.models.append(ModelRegistration(
            architecture=architecture, model_class=model_class, framework=framework))
