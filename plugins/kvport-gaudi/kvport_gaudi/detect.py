"""Is there an Intel Gaudi and its PyTorch stack? Answered without importing either.

* habana_frameworks (Intel Gaudi's PyTorch bridge) is looked up with find_spec, never
  imported: importing it loads the device runtime;
* Gaudi devices are the habanalabs driver's device files: /dev/accel/accel<N> (kernels with
  the accel subsystem) or /dev/hl<N> (older drivers);
* HABANA_VISIBLE_MODULES (comma-separated module ids) set to nothing hides every device.
"""
from __future__ import annotations

import importlib.util
import os
import re

DEVICE_PATTERNS = (("/dev/accel", re.compile(r"accel\d+$")), ("/dev", re.compile(r"hl\d+$")))
VISIBILITY_VARIABLE = "HABANA_VISIBLE_MODULES"
GAUDI_STACK_HINT = ("install Intel Gaudi's PyTorch stack (the habana-torch-plugin wheels of the "
                    "Intel Gaudi software, or one of its Docker images)")


def gaudi_device_files(patterns=DEVICE_PATTERNS) -> list[str]:
    """Paths of the Gaudi device files the driver created (empty when there is none)."""
    found = []
    for folder, pattern in patterns:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        found += sorted(os.path.join(folder, n) for n in names if pattern.match(n))
    return found


def habana_torch_importable() -> bool:
    """habana_frameworks.torch can be imported (found on disk; nothing is imported)."""
    spec = importlib.util.find_spec("habana_frameworks")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(os.path.isdir(os.path.join(folder, "torch"))
               for folder in spec.submodule_search_locations)


def gaudi_is_available(patterns=DEVICE_PATTERNS) -> tuple[bool, str]:
    """(available, reason) for the `hpu` platform. Never raises."""
    try:
        if not habana_torch_importable():
            return False, f"habana_frameworks.torch is not importable: {GAUDI_STACK_HINT}"
        modules = os.environ.get(VISIBILITY_VARIABLE)
        if modules is not None and not modules.strip():
            return False, f"{VISIBILITY_VARIABLE}='' hides every Gaudi"
        devices = gaudi_device_files(patterns)
        if not devices:
            return False, ("no Gaudi device: no /dev/accel/accel* or /dev/hl* (is the "
                           "habanalabs driver loaded?)")
        visible = f" ({VISIBILITY_VARIABLE}={modules})" if modules else ""
        return True, f"{len(devices)} Gaudi device(s){visible}"
    except Exception as exc:     # the contract: report, never raise
        return False, f"Gaudi detection failed: {type(exc).__name__}: {exc}"
