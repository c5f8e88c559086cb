"""The plugin manager: discovery, registration bookkeeping, platform selection, error messages.

A `PluginRegistry` finds plugins through the ``kvport`` entry-point group, registers them
(plus the built-in plugin, `kvport.builtin_plugin`) with pluggy and calls the three hooks of
`kvport.platforms.hookspecs` once. Everything is lazy: constructing a registry does nothing;
the first query loads, and later queries reuse the result.

Failures never disappear:

* a plugin that fails to import (or whose hooks raise) is recorded as a `PluginLoadFailure`,
  logged with its full traceback, and the other plugins still load; when a device then cannot
  be found, the error repeats each failure's traceback, since that plugin may be the one that
  would have provided it;
* a plugin whose declared plugin API range (``KVPORT_PLUGIN_API``) excludes this kvport's
  ``PLUGIN_API_VERSION``, or that declares none, is refused before pluggy sees its hooks: a
  `PluginRefusal` whose message names both versions and what to install;
* two plugins registering the same platform or attention-backend name is a configuration
  error (`DuplicateRegistrationError`) naming both;
* every selection error (`PlatformSelectionError`) says what to do: which package to
  install, why the device is unavailable, which entry point the allow-list left out.

The registry imports no framework (torch, jax): registered classes are dotted paths, imported
only when asked for (`select_platform`, `attention_backend_class`, `model_class`).

Prefer creating a registry and passing it explicitly; `default_registry()` is a cached
process-wide instance for entry points such as the CLI.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import os
import threading
import traceback
from typing import Any, Iterable

import pluggy

from kvport.platforms import hookspecs
from kvport.platforms.api_version import API_DECLARATION, PLUGIN_API_VERSION, refusal_message
from kvport.platforms.errors import (
    AttentionBackendError,
    DuplicateRegistrationError,
    PlatformSelectionError,
    PluginImportError,
    UnsupportedModelError,
)
from kvport.platforms.hookspecs import (
    ENTRY_POINT_GROUP,
    PROJECT_NAME,
    AttentionBackendRegistration,
    ModelRegistration,
    PlatformRegistration,
)
from kvport.platforms.interface import Platform
from kvport.platforms.messages import (
    DEVICE_ENV,
    DEVICE_PACKAGES,
    PLUGINS_ENV,
    SelectionMessages,
    indent,
)
from kvport.platforms.records import (
    BUILTIN_PLUGIN_MODULE,
    BUILTIN_PLUGIN_NAME,
    PluginInfo,
    PluginLoadFailure,
    PluginRefusal,
    Staged,
    builtin_info,
    import_object,
    plugin_info,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEVICE_ENV", "DEVICE_PACKAGES", "PLUGINS_ENV", "BUILTIN_PLUGIN_NAME", "BUILTIN_PLUGIN_MODULE",
    "AttentionBackendError", "DuplicateRegistrationError", "PlatformSelectionError",
    "PluginImportError", "UnsupportedModelError", "PluginInfo", "PluginLoadFailure",
    "PluginRefusal", "PluginRegistry", "default_registry", "import_object",
]


def _parse_allow_list(raw: str | None) -> tuple[str, ...] | None:
    """KVPORT_PLUGINS: comma-separated entry-point names. Unset or blank: no restriction."""
    if raw is None or not raw.strip():
        return None
    return tuple(name.strip() for name in raw.split(",") if name.strip())


# --------------------------------------------------------------------------- registry


class PluginRegistry(SelectionMessages):
    """Discovers kvport plugins and answers what they provide.

    allow_list: entry-point names to load; None reads ``KVPORT_PLUGINS`` (comma-separated;
        unset or blank means every installed plugin). The built-in plugin always loads.
    entry_points: the entry points to consider instead of
        ``importlib.metadata.entry_points(group="kvport")`` (tests, embedding).

    Plugins load on the first query, in entry-point-name order after the built-in one (so
    "later plugin wins" for models is deterministic). Thread-safe.
    """

    def __init__(self, allow_list: list[str] | None = None,
                 entry_points: Iterable[importlib.metadata.EntryPoint] | None = None):
        if allow_list is None:
            self._allow_list_text = os.environ.get(PLUGINS_ENV)
            self._allow_list = _parse_allow_list(self._allow_list_text)
            self._allow_list_source = PLUGINS_ENV
        else:
            self._allow_list = tuple(allow_list)
            self._allow_list_text = ",".join(allow_list)
            self._allow_list_source = "allow_list"
        self._entry_points_override = list(entry_points) if entry_points is not None else None

        self._lock = threading.RLock()
        self._loaded = False
        self._load_error: BaseException | None = None
        self._pm = pluggy.PluginManager(PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)

        self._plugins: list[PluginInfo] = []
        self._failures: list[PluginLoadFailure] = []
        self._refused: list[PluginRefusal] = []
        self._excluded: list[PluginInfo] = []
        self._unmatched_allowed: list[str] = []
        self._platforms: dict[str, PlatformRegistration] = {}
        self._backends: dict[str, AttentionBackendRegistration] = {}
        self._models: dict[tuple[str, str], ModelRegistration] = {}
        self._origins: dict[tuple[str, ...], PluginInfo] = {}
        self._availability: dict[str, tuple[bool, str]] = {}
        self._instances: dict[str, Platform] = {}

    # ------------------------------------------------------------------ loading

    def load(self) -> None:
        """Import and register every plugin once. Later calls do nothing (or re-raise the
        configuration error the first call hit, e.g. a duplicate platform name)."""
        with self._lock:
            if self._load_error is not None:
                raise self._load_error
            if self._loaded:
                return
            try:
                self._load_all()
            except Exception as exc:
                self._load_error = exc
                raise
            self._loaded = True

    def _load_all(self) -> None:
        builtin = importlib.import_module(BUILTIN_PLUGIN_MODULE)
        info = self._accepted(builtin_info(), builtin)
        if info is None:   # only a broken installation gets here: say so loudly
            raise RuntimeError(self._refused[-1].message)
        self._pm.register(builtin, name=BUILTIN_PLUGIN_NAME)
        loaded = [(info, builtin)] + self._import_entry_points()
        for info, plugin in loaded:
            self._run_hooks(info, plugin)

    def _discover(self) -> list[importlib.metadata.EntryPoint]:
        if self._entry_points_override is not None:
            eps = self._entry_points_override
        else:
            eps = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
        # Filesystem order is arbitrary; sort so plugin order (model overrides) is stable.
        return sorted(eps, key=lambda ep: ep.name)

    def _import_entry_points(self) -> list[tuple[PluginInfo, Any]]:
        """Import entry points one by one; a failing one is recorded and the rest go on."""
        loaded: list[tuple[PluginInfo, Any]] = []
        seen: dict[str, PluginInfo] = {BUILTIN_PLUGIN_NAME: builtin_info()}
        eps = self._discover()
        for ep in eps:
            info = plugin_info(ep)
            if self._allow_list is not None and ep.name not in self._allow_list:
                self._excluded.append(info)
                continue
            if ep.name in seen:
                self._record_failure(info, (
                    f"entry point name '{ep.name}' is also used by {seen[ep.name].describe()}; "
                    f"entry-point names must be unique: uninstall one of "
                    f"{seen[ep.name].package} and {info.package}\n"))
                continue
            result = self._import_one(ep, info)
            if result is not None:
                seen[ep.name] = result[0]
                loaded.append(result)
        if self._allow_list is not None:
            names = {ep.name for ep in eps} | {BUILTIN_PLUGIN_NAME}
            self._unmatched_allowed = [n for n in self._allow_list if n not in names]
            for name in self._unmatched_allowed:
                logger.warning("%s names entry point %r, but no installed kvport plugin has "
                               "that name", self._allow_list_desc(), name)
        return loaded

    def _import_one(self, ep: importlib.metadata.EntryPoint,
                    info: PluginInfo) -> tuple[PluginInfo, Any] | None:
        """Import one entry point, check its plugin API range, register it with pluggy."""
        try:
            plugin = ep.load()
        except Exception:
            self._record_failure(info, traceback.format_exc())
            return None
        # Checked before pluggy sees the hooks: a plugin for another API version may name
        # hook arguments this kvport lacks, and the version message is the useful one.
        accepted = self._accepted(info, plugin)
        if accepted is None:
            return None
        try:
            self._pm.register(plugin, name=ep.name)
        except Exception:
            self._record_failure(info, traceback.format_exc())
            return None
        self._warn_unknown_hooks(info, plugin)
        return accepted, plugin

    def _accepted(self, info: PluginInfo, plugin: Any) -> PluginInfo | None:
        """`info` with its declared API range, or None (refusal recorded) if incompatible."""
        declared = getattr(plugin, API_DECLARATION, None)
        module = info.module or getattr(plugin, "__name__", repr(plugin))
        message = refusal_message(declared, info.describe(), info.package, module,
                                  builtin_info().dist_version, PLUGIN_API_VERSION)
        if message is not None:
            self._refused.append(PluginRefusal(info, declared if isinstance(declared, str)
                                               else None, message))
            logger.warning("kvport refuses %s (other plugins are unaffected): %s",
                           info.describe(), message)
            return None
        return PluginInfo(info.name, info.dist_name, info.dist_version, info.module,
                          api_range=declared)

    def _warn_unknown_hooks(self, info: PluginInfo, plugin: Any) -> None:
        # pluggy accepts hookimpls without a spec silently; most likely the plugin targets a
        # newer kvport, which the user should hear about.
        for caller in self._pm.get_hookcallers(plugin) or []:
            if not caller.has_spec():
                logger.warning("%s implements hook %r, which this kvport does not define "
                               "(is it built for a newer kvport?); the hook is ignored",
                               info.describe(), caller.name)

    def _record_failure(self, info: PluginInfo, traceback_text: str) -> None:
        failure = PluginLoadFailure(info.name, info.dist_name, info.dist_version, traceback_text)
        self._failures.append(failure)
        logger.warning("kvport %s failed to load and is skipped (other plugins are "
                       "unaffected):\n%s", info.describe(), traceback_text.rstrip())

    def _run_hooks(self, info: PluginInfo, plugin: Any) -> None:
        """Call this plugin's three hooks (only its own), then commit what it registered."""
        staged = Staged()
        hooks = (("kvport_register_platforms", staged.register_platform),
                 ("kvport_register_attention_backends", staged.register_attention_backend),
                 ("kvport_register_models", staged.register_model))
        # Calling each plugin separately (instead of one pluggy broadcast, which runs the
        # last-registered plugin first) lets us attribute every registration to its plugin
        # and keep "builtin first, later plugins win" for models.
        others = [p for p in self._pm.get_plugins() if p is not plugin]
        try:
            for hook_name, register in hooks:
                self._pm.subset_hook_caller(hook_name, remove_plugins=others)(register=register)
        except Exception:
            # A raising hook is the plugin's bug: drop everything it registered, keep going.
            self._pm.unregister(plugin)
            self._record_failure(info, traceback.format_exc())
            return
        self._plugins.append(info)
        self._commit(info, staged)

    def _commit(self, info: PluginInfo, staged: Staged) -> None:
        for reg in staged.platforms:
            self._check_unique("platform", reg.name, info)
            self._platforms[reg.name] = reg
            self._origins[("platform", reg.name)] = info
        for reg in staged.attention_backends:
            self._check_unique("attention_backend", reg.name, info)
            self._backends[reg.name] = reg
            self._origins[("attention_backend", reg.name)] = info
        for reg in staged.models:
            key = (reg.architecture, reg.framework)
            previous = self._origins.get(("model",) + key)
            if previous is not None:
                logger.info("model %s (%s) from %s replaces the one from %s", reg.architecture,
                            reg.framework, info.describe(), previous.describe())
            self._models[key] = reg
            self._origins[("model",) + key] = info

    def _check_unique(self, kind: str, name: str, info: PluginInfo) -> None:
        previous = self._origins.get((kind, name))
        if previous is None:
            return
        label = kind.replace("_", " ")
        if previous == info:
            raise DuplicateRegistrationError(
                f"{info.describe()} registers {label} {name!r} twice; this is a bug in "
                f"{info.package}")
        raise DuplicateRegistrationError(
            f"{label} {name!r} is registered by two plugins: {previous.describe()} and "
            f"{info.describe()}. Uninstall one of them, or load only one by listing the "
            f"entry points to load in {PLUGINS_ENV} (comma-separated).")

    # ------------------------------------------------------------------ queries

    @property
    def load_failures(self) -> list[PluginLoadFailure]:
        """Plugins that failed to import or register, with their tracebacks."""
        self.load()
        return list(self._failures)

    @property
    def refused_plugins(self) -> list[PluginRefusal]:
        """Plugins not loaded because their plugin API range excludes this kvport's."""
        self.load()
        return list(self._refused)

    @property
    def excluded_plugins(self) -> list[PluginInfo]:
        """Installed entry points that the allow-list left out (not imported)."""
        self.load()
        return list(self._excluded)

    def plugins(self) -> list[PluginInfo]:
        """Plugins that loaded, the built-in one first."""
        self.load()
        return list(self._plugins)

    def platforms(self) -> list[PlatformRegistration]:
        """Registered platforms in auto-selection order (priority, then load order)."""
        self.load()
        return sorted(self._platforms.values(), key=lambda reg: reg.priority)

    def attention_backends(self, device_type: str | None = None
                           ) -> list[AttentionBackendRegistration]:
        """Registered attention backends; with `device_type`, only those that run on it."""
        self.load()
        return [reg for reg in self._backends.values()
                if device_type is None or not reg.device_types or device_type in reg.device_types]

    def models(self, framework: str | None = None) -> list[ModelRegistration]:
        """Registered model implementations (after later plugins replaced earlier ones)."""
        self.load()
        return [reg for reg in self._models.values()
                if framework is None or reg.framework == framework]

    def origin(self, registration: PlatformRegistration | AttentionBackendRegistration
               | ModelRegistration) -> PluginInfo:
        """The plugin (entry point and distribution) that registered `registration`."""
        self.load()
        if isinstance(registration, PlatformRegistration):
            key: tuple[str, ...] = ("platform", registration.name)
        elif isinstance(registration, AttentionBackendRegistration):
            key = ("attention_backend", registration.name)
        elif isinstance(registration, ModelRegistration):
            key = ("model", registration.architecture, registration.framework)
        else:
            raise TypeError(f"not a kvport registration: {registration!r}")
        try:
            return self._origins[key]
        except KeyError:
            raise KeyError(f"{registration!r} is not registered in this registry") from None

    def availability(self, registration: PlatformRegistration) -> tuple[bool, str]:
        """(available, reason) of a platform, checked once. A raising check is reported as a
        plugin bug and counts as unavailable."""
        with self._lock:
            if registration.name not in self._availability:
                self._availability[registration.name] = self._check_availability(registration)
            return self._availability[registration.name]

    def _check_availability(self, reg: PlatformRegistration) -> tuple[bool, str]:
        info = self.origin(reg)
        try:
            result = reg.is_available()
        except Exception as exc:
            logger.warning("the availability check of platform %r from %s raised; treating it "
                           "as unavailable. is_available must never raise: this is a bug in "
                           "%s", reg.name, info.describe(), info.package, exc_info=True)
            return False, (f"availability check raised: {type(exc).__name__}: {exc} "
                           f"(a bug in {info.package}: is_available must never raise; "
                           f"please report it to its authors)")
        if isinstance(result, bool):   # tolerate a bare bool; there is just no reason to show
            return result, ""
        if (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], bool)):
            return result[0], str(result[1])
        return False, (f"availability check returned {result!r} instead of (bool, reason) "
                       f"(a bug in {info.package})")

    # ------------------------------------------------------------------ selection

    def select_platform(self, device: str | None = None) -> Platform:
        """The Platform instance to run on.

        `device` (``--device``) names a device type or platform name; None reads
        ``KVPORT_DEVICE``; if that is unset too, the first available platform in priority
        order wins (CPU last). The Platform class is imported only now. Raises
        PlatformSelectionError saying what to install or why the device is unavailable.
        """
        return self._instantiate(self.select_registration(device))

    def select_registration(self, device: str | None = None) -> PlatformRegistration:
        """The registration `select_platform(device)` picks, without importing its class."""
        self.load()
        if device is None:
            device = os.environ.get(DEVICE_ENV)
        device = (device or "").strip() or None
        return self._auto_select() if device is None else self._select_device(device)

    def _candidates(self, device: str) -> list[PlatformRegistration]:
        wanted = device.casefold()
        by_name = [reg for reg in self.platforms() if reg.name.casefold() == wanted]
        if by_name:
            return by_name
        return [reg for reg in self.platforms() if reg.device_type.casefold() == wanted]

    def _select_device(self, device: str) -> PlatformRegistration:
        candidates = self._candidates(device)
        if not candidates:
            raise PlatformSelectionError(self._missing_device_message(device))
        reasons = []
        for reg in candidates:
            available, reason = self.availability(reg)
            if available:
                return reg
            reasons.append((reg, reason))
        raise PlatformSelectionError(self._unavailable_message(device, reasons))

    def _auto_select(self) -> PlatformRegistration:
        reasons = []
        for reg in self.platforms():
            available, reason = self.availability(reg)
            if available:
                return reg
            reasons.append((reg, reason))
        raise PlatformSelectionError(self._nothing_available_message(reasons))

    def _instantiate(self, reg: PlatformRegistration) -> Platform:
        with self._lock:
            if reg.name not in self._instances:
                self._instances[reg.name] = self._construct(reg)
            return self._instances[reg.name]

    def _construct(self, reg: PlatformRegistration) -> Platform:
        info = self.origin(reg)
        try:
            cls = import_object(reg.platform_class)
        except Exception as exc:
            raise PlatformSelectionError(
                f"platform {reg.name!r} from {info.describe()} was selected, but its class "
                f"{reg.platform_class!r} failed to import (a bug or a missing dependency of "
                f"{info.package}; try reinstalling it):\n"
                f"{indent(traceback.format_exc())}") from exc
        if not (isinstance(cls, type) and issubclass(cls, Platform)):
            raise PlatformSelectionError(
                f"platform {reg.name!r} from {info.describe()}: {reg.platform_class!r} is not a "
                f"subclass of kvport.platforms.interface.Platform (a bug in {info.package})")
        try:
            return cls()
        except Exception as exc:
            raise PlatformSelectionError(
                f"platform {reg.name!r} from {info.describe()} failed to initialise:\n"
                f"{indent(traceback.format_exc())}") from exc

    # ------------------------------------------------------------------ classes

    def attention_backend_class(self, name: str, device_type: str) -> type:
        """Import and return the attention backend class registered as `name`, checking that
        it runs on `device_type`."""
        self.load()
        reg = self._backends.get(name)
        if reg is None:
            usable = ", ".join(r.name for r in self.attention_backends(device_type)) or "none"
            raise AttentionBackendError(
                f"unknown attention backend {name!r}; registered: "
                f"{', '.join(self._backends) or 'none'} (usable on {device_type!r}: {usable})"
                + self._failed_names_note())
        if reg.device_types and device_type not in reg.device_types:
            usable = ", ".join(r.name for r in self.attention_backends(device_type)) or "none"
            raise AttentionBackendError(
                f"attention backend {name!r} from {self.origin(reg).describe()} runs on "
                f"{', '.join(reg.device_types)}, not on {device_type!r}; backends usable on "
                f"{device_type!r}: {usable}")
        cls = self._import_registered(reg.backend_class, f"attention backend {name!r}",
                                      self.origin(reg))
        from kvport.attention_backends.interface import AttentionBackend  # numpy only
        if not (isinstance(cls, type) and issubclass(cls, AttentionBackend)):
            raise AttentionBackendError(
                f"attention backend {name!r}: {reg.backend_class!r} is not a subclass of "
                f"kvport.attention_backends.interface.AttentionBackend (a bug in "
                f"{self.origin(reg).package})")
        return cls

    def model_class(self, architecture: str, framework: str = "torch") -> type:
        """Import and return the model class for a Hugging Face architecture name."""
        self.load()
        reg = self._models.get((architecture, framework))
        if reg is None:
            supported = sorted(a for a, fw in self._models if fw == framework)
            message = (f"model architecture {architecture!r} is not supported (framework "
                       f"{framework!r}); supported architectures: "
                       f"{', '.join(supported) or 'none'}")
            elsewhere = sorted(fw for a, fw in self._models if a == architecture)
            if elsewhere:
                message += (f". {architecture} is available for framework(s) "
                            f"{', '.join(elsewhere)}: use a platform of that framework")
            else:
                message += (". A plugin can add it through the kvport_register_models hook")
            raise UnsupportedModelError(message + self._failed_names_note())
        return self._import_registered(reg.model_class, f"model {architecture!r}",
                                       self.origin(reg))

    @staticmethod
    def _import_registered(dotted: str, what: str, info: PluginInfo) -> Any:
        try:
            return import_object(dotted)
        except Exception as exc:
            raise PluginImportError(
                f"{what} from {info.describe()} could not be imported from {dotted!r}:\n"
                f"{indent(traceback.format_exc())}") from exc


@functools.cache
def default_registry() -> PluginRegistry:
    """The process-wide registry, created on first call and cached (reads KVPORT_PLUGINS then).

    Meant for top-level entry points (CLI, `LLM(...)` without an explicit registry); library
    code should take a `PluginRegistry` argument instead. `default_registry.cache_clear()`
    drops the cached instance (tests, or after changing KVPORT_PLUGINS).
    """
    return PluginRegistry()
