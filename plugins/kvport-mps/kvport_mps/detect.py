"""Is this an Apple Silicon Mac that PyTorch's MPS backend can use? Answered without
importing torch (the registry asks on every machine, for every kvport command).

MPS needs macOS 12.3 or later on an arm64 Mac, and PyTorch's macOS wheels have been arm64
only since 2.3. Whether torch's Metal device actually opens (torch.backends.mps.is_available(),
which fails e.g. in a VM without GPU access) is asked when the platform is selected, where
importing torch is allowed.
"""
from __future__ import annotations

import importlib.util
import platform
import sys

MIN_MACOS = (12, 3)


def parse_version(text: str) -> tuple[int, ...]:
    """"14.5.1" -> (14, 5, 1); "" -> ()."""
    parts = []
    for piece in text.split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


def mps_is_available(system: str | None = None, machine: str | None = None,
                     macos: str | None = None) -> tuple[bool, str]:
    """(available, reason) for the `mps` platform. Never raises. The arguments override
    what this machine reports (tests)."""
    try:
        system = sys.platform if system is None else system
        machine = platform.machine() if machine is None else machine
        if system != "darwin":
            return False, (f"Apple Silicon Macs only: this machine runs {system} "
                           f"({machine}), and torch.backends.mps exists only on macOS")
        if machine != "arm64":
            return False, (f"Apple Silicon Macs only: this Mac is {machine}; PyTorch's MPS "
                           "builds are for arm64")
        macos = platform.mac_ver()[0] if macos is None else macos
        version = parse_version(macos)
        if version < MIN_MACOS:
            return False, f"macOS {macos or '?'} is too old: MPS needs macOS 12.3 or later"
        if importlib.util.find_spec("torch") is None:
            return False, "torch is not installed: run `pip install torch`"
        return True, f"Apple Silicon GPU, macOS {macos}"
    except Exception as exc:     # the contract: report, never raise
        return False, f"MPS detection failed: {type(exc).__name__}: {exc}"
