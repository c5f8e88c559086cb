"""The texts of the registry's selection errors: what is missing, why, and what to do.

`SelectionMessages` is a mixin of `PluginRegistry`; it reads the registry's load report
(`_excluded`, `_failures`, `_refused`, `_unmatched_allowed`) and registrations, never changes
them.
"""
from __future__ import annotations

import textwrap

from kvport.platforms.hookspecs import PlatformRegistration
from kvport.platforms.records import PluginInfo

PLUGINS_ENV = "KVPORT_PLUGINS"
DEVICE_ENV = "KVPORT_DEVICE"

# The package that provides each well-known device, for "install it with ..." messages.
DEVICE_PACKAGES: dict[str, str] = {
    "cuda": "kvport-cuda",
    "rocm": "kvport-rocm",
    "tpu": "kvport-tpu",
    "xla": "kvport-tpu",
    "hpu": "kvport-gaudi",
    "neuron": "kvport-neuron",
    "mps": "kvport-mps",
    "cpu": "kvport-cpu",
}


def indent(text: str) -> str:
    return textwrap.indent(text.rstrip(), "    ")


class SelectionMessages:
    """Error texts for PluginRegistry (mixin)."""

    def _installed_devices(self) -> list[str]:
        return sorted({reg.device_type for reg in self._platforms.values()})

    def _missing_device_message(self, device: str) -> str:
        package = DEVICE_PACKAGES.get(device.casefold())
        installed = ", ".join(self._installed_devices()) or "none"
        excluded = [i for i in self._excluded if package and i.dist_name == package]
        failed = [f for f in self._failures if package and f.dist_name == package]
        refused = [r for r in self._refused if package and r.info.dist_name == package]
        if excluded:
            head = (f"no loaded kvport plugin provides device {device!r}: {package} is "
                    f"installed, but its entry point '{excluded[0].name}' is not in "
                    f"{self._allow_list_desc()}; add it there")
        elif refused:
            head = (f"no loaded kvport plugin provides device {device!r}: {package} is "
                    f"installed but was refused: {refused[0].message}")
        elif failed:
            head = (f"no loaded kvport plugin provides device {device!r}: {package} is "
                    f"installed but failed to load (traceback below); reinstall it with "
                    f"`pip install --force-reinstall {package}` or report the error")
        elif package is not None:
            head = (f"no kvport plugin provides device {device!r}: install it with "
                    f"`pip install {package}` (installed devices: {installed})")
        else:
            head = (f"no kvport plugin provides device {device!r}; installed devices: "
                    f"{installed}. Pick one with --device / {DEVICE_ENV}, or install the "
                    f"plugin for your hardware (e.g. "
                    + ", ".join(f"`pip install {p}`" for p in sorted(set(DEVICE_PACKAGES.values())))
                    + ")")
        return self._with_notes(head, skip_refused=refused[:1])

    def _unavailable_message(self, device: str,
                             reasons: list[tuple[PlatformRegistration, str]]) -> str:
        if len(reasons) == 1:
            reg, reason = reasons[0]
            head = (f"device {device!r} is provided by {self.origin(reg).package} but is not "
                    f"available here: {reason or '(the plugin gave no reason)'}")
        else:
            head = f"device {device!r} is provided by several plugins, none available here:"
            head += "".join(f"\n  - {self._reason_line(reg, reason)}" for reg, reason in reasons)
        others = [reg.device_type for reg in self.platforms()
                  if reg.device_type != reasons[0][0].device_type and self.availability(reg)[0]]
        if others:
            head += (f"\nAvailable here instead: {', '.join(dict.fromkeys(others))} (choose with "
                     f"--device / {DEVICE_ENV}, or set neither to auto-select)")
        return head

    def _nothing_available_message(self,
                                   reasons: list[tuple[PlatformRegistration, str]]) -> str:
        if not reasons:
            head = ("no kvport platform plugin is installed: install the one for your hardware, "
                    "e.g. `pip install kvport-cpu` (CPU) or `pip install kvport-cuda` "
                    "(NVIDIA GPUs)")
        else:
            head = "no kvport platform is available here:"
            head += "".join(f"\n  - {self._reason_line(reg, reason)}" for reg, reason in reasons)
            head += "\nInstall the plugin for your hardware, e.g. `pip install kvport-cpu`."
        return self._with_notes(head)

    def _reason_line(self, reg: PlatformRegistration, reason: str) -> str:
        info = self.origin(reg)
        return (f"{reg.name} (device {reg.device_type!r}, {info.describe()}, priority "
                f"{reg.priority}): {reason or '(the plugin gave no reason)'}")

    def _with_notes(self, head: str, skip_refused=()) -> str:
        """Append what may explain a missing platform: exclusions, refusals, import failures."""
        notes = [self._excluded_note(info) for info in self._excluded]
        notes += [f"{self._allow_list_desc()} names entry point "
                  f"{name!r}, but no installed kvport plugin has that name"
                  for name in self._unmatched_allowed]
        notes += [f"{refusal.message}; it may be the plugin that provides it"
                  for refusal in self._refused if refusal not in skip_refused]
        notes += [f"{failure.info.describe()} failed to load, and may be the plugin that "
                  f"provides it:\n{indent(failure.traceback_text)}"
                  for failure in self._failures]
        return head + "".join(f"\n\nNote: {note}" for note in notes)

    def _allow_list_desc(self) -> str:
        if self._allow_list_source == PLUGINS_ENV:
            return f"{PLUGINS_ENV}={self._allow_list_text}"
        return f"the plugin allow-list ({self._allow_list_text})"

    def _excluded_note(self, info: PluginInfo) -> str:
        return (f"entry point '{info.name}' ({info.package}) is installed but not in "
                f"{self._allow_list_desc()}; add it there to load it")

    def _failed_names_note(self) -> str:
        broken = [f.info.describe() for f in self._failures]
        broken += [r.info.describe() for r in self._refused]
        if not broken:
            return ""
        return (f" (note: {', '.join(broken)} failed to load or was refused and may have "
                f"provided it; see the warning log or `kvport plugins`)")
