"""Foreign backends: attention backends registered for another device, checked on this one.

A plugin for hardware that cannot be reached (Gaudi, Trainium, Apple GPUs on a Linux CI
machine) can still prove its attention formulation: its torch code runs on any torch device.
`--kvport-foreign-backend NAME` (`kvport plugins test cpu --foreign-backend NAME`, or a module
constant ``KVPORT_FOREIGN_BACKENDS``) lends the backend to the device under test, and the kit
checks it there like one of the device's own: numerically against the reference over the
grid, and end to end through the engine against torch_reference's tokens.

Lending happens only in the kit's own registry; `kvport serve` never runs a backend on a
device it was not registered for.
"""
from __future__ import annotations

from kvport.platforms.registry import AttentionBackendError, PluginRegistry

MODULE_FOREIGN_BACKENDS = "KVPORT_FOREIGN_BACKENDS"


class ForeignBackendRegistry(PluginRegistry):
    """A PluginRegistry that also offers the `foreign` backends on every device."""

    def __init__(self, foreign: tuple[str, ...]):
        super().__init__()
        self.foreign = tuple(foreign)

    def check_foreign(self) -> None:
        """Raise AttentionBackendError naming each foreign backend nobody registered."""
        registered = {reg.name for reg in super().attention_backends()}
        unknown = [name for name in self.foreign if name not in registered]
        if unknown:
            raise AttentionBackendError(
                f"foreign attention backend(s) {', '.join(unknown)} are not registered by any "
                f"installed plugin; registered: {', '.join(sorted(registered))}")

    def attention_backends(self, device_type: str | None = None):
        """The device's own backends, then the foreign ones it lacks."""
        own = super().attention_backends(device_type)
        if device_type is None:
            return own
        names = {reg.name for reg in own}
        return own + [reg for reg in super().attention_backends()
                      if reg.name in self.foreign and reg.name not in names]

    def attention_backend_class(self, name: str, device_type: str) -> type:
        """A foreign backend's class, imported as for its own first device."""
        if name in self.foreign:
            reg = next((r for r in super().attention_backends() if r.name == name), None)
            if reg is not None and reg.device_types:
                device_type = reg.device_types[0]
        return super().attention_backend_class(name, device_type)
