"""What the kit checks: the device named by --kvport-device (or a module's KVPORT_DEVICE),
resolved once per pytest run into its registry, registration and Platform instance.

Resolution never raises: a failure is kept as `error` and reported by the first check that
needs the platform, so collection always succeeds and the report says what is wrong.
"""
from __future__ import annotations

import random
import traceback
from dataclasses import dataclass, field
from typing import Any

import pytest

MODULE_DEVICE = "KVPORT_DEVICE"          # a module that star-imports the kit may set this
_TARGETS = pytest.StashKey[dict]()


@dataclass
class KitOptions:
    """The kit's command-line options."""
    device: str | None
    full_grid: bool
    backends: tuple[str, ...]
    seed: int
    foreign_backends: tuple[str, ...] = ()   # see kvport/testing/foreign.py


@dataclass
class KitTarget:
    """The platform under test. `error` is set when it cannot be tested here."""
    device: str
    registry: Any = None
    registration: Any = None
    platform: Any = None
    error: str | None = None
    _torch_device: Any = field(default=None, repr=False)

    def require(self) -> "KitTarget":
        """The target, or a failed test saying why the device cannot be tested."""
        if self.error is not None:
            pytest.fail(self.error, pytrace=False)
        return self

    @property
    def framework(self) -> str:
        return self.registration.framework

    @property
    def name(self) -> str:
        """The platform's registered name: what `device=` selects unambiguously."""
        return self.registration.name

    def attention_backends(self) -> list:
        """Registrations of the backends usable on this device, by name."""
        return sorted(self.registry.attention_backends(self.registration.device_type),
                      key=lambda reg: reg.name)

    def torch_device(self):
        """The torch device this platform's worker computes on, asked of a fresh worker
        (`TorchWorker.torch_device()`), so a plugin whose device type is not a torch device
        name (rocm -> cuda) is handled by its own code."""
        if self._torch_device is None:
            from kvport.core.config import EngineConfig
            from kvport.platforms import import_object

            worker_class = import_object(self.platform.worker_class())
            config = EngineConfig.from_kwargs(device=self.name, dtype="float32")
            worker = worker_class(config, None, self.platform, self.registry)
            if not callable(getattr(worker, "torch_device", None)):
                raise TypeError(framework_mismatch(self))
            self._torch_device = worker.torch_device()
        return self._torch_device


def framework_mismatch(target: KitTarget) -> str:
    """Why a platform registered as torch cannot be checked as one."""
    reg = target.registration
    return (f"platform {reg.name!r} is registered with framework={reg.framework!r} (the "
            f"default is 'torch'), but its worker {target.platform.worker_class()} has no "
            "torch_device(), so it is not a torch worker (kvport.torch_worker.worker."
            "TorchWorker). If it computes with another framework, register the platform and "
            "its attention backends with framework=\"jax\" (or yours): the kit then runs its "
            "platform and end-to-end checks and skips the torch-based ones")


def kit_options(config: pytest.Config, module: Any = None) -> KitOptions:
    """Options from the command line; the device falls back to the module's KVPORT_DEVICE,
    the foreign backends to its KVPORT_FOREIGN_BACKENDS."""
    from kvport.testing.foreign import MODULE_FOREIGN_BACKENDS

    device = config.getoption("kvport_device", None) or getattr(module, MODULE_DEVICE, None)
    foreign = (config.getoption("kvport_foreign_backend", None)
               or getattr(module, MODULE_FOREIGN_BACKENDS, None) or ())
    seed = config.getoption("kvport_seed", None)
    if seed is None:
        seed = _run_seed(config)
    return KitOptions(device=device, full_grid=bool(config.getoption("kvport_full_grid", False)),
                      backends=tuple(config.getoption("kvport_backend", None) or ()),
                      seed=int(seed), foreign_backends=tuple(foreign))


def _run_seed(config: pytest.Config) -> int:
    """One fresh seed per run (inputs are random each run), shown in the report header."""
    targets = config.stash.setdefault(_TARGETS, {})
    if "seed" not in targets:
        targets["seed"] = random.SystemRandom().randrange(2**31)
    return targets["seed"]


def resolve_target(config: pytest.Config, device: str | None,
                   foreign: tuple[str, ...] = ()) -> KitTarget:
    """The KitTarget for `device` (with `foreign` backends lent to it), resolved once per run."""
    targets = config.stash.setdefault(_TARGETS, {})
    key = ("target", device, tuple(foreign))
    if key not in targets:
        targets[key] = _resolve(device, tuple(foreign))
    return targets[key]


def _resolve(device: str | None, foreign: tuple[str, ...] = ()) -> KitTarget:
    if not device:
        return KitTarget(device="", error=(
            "no device to check: run `pytest --kvport-device NAME` / `kvport plugins test "
            f"NAME`, or set {MODULE_DEVICE} = \"NAME\" in the module that imports the kit"))
    from kvport.platforms import PluginRegistry
    from kvport.testing.foreign import ForeignBackendRegistry

    registry = ForeignBackendRegistry(foreign) if foreign else PluginRegistry()
    target = KitTarget(device=device, registry=registry)
    try:
        if foreign:
            registry.check_foreign()
        target.registration = target.registry.select_registration(device)
        target.platform = target.registry.select_platform(target.registration.name)
    except Exception as exc:   # selection errors already say what to do
        target.error = (f"the kit cannot check device {device!r}: "
                        f"{type(exc).__name__}: {exc}")
        if not str(exc):
            target.error += "\n" + traceback.format_exc()
    return target
