"""Cheap availability checks for the `tpu` and `xla` platforms.

They run whenever kvport lists or auto-selects platforms, so they must never raise and must
not start a JAX backend (initialising libtpu takes seconds and grabs the chips). They look
only at installed packages and device files.
"""
from __future__ import annotations

import glob
import importlib.util
import os

XLA_HINT = ("to run the same JAX worker on this machine's CPU or GPU, use `--device xla` "
            "(kvport-tpu's development platform)")
TORCH_XLA_NOTE = ("torch-xla is not supported: kvport's TPU path is JAX, and torch-xla has no "
                  "build for the torch kvport uses (2.13)")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def tpu_device_files() -> list[str]:
    """TPU chips the kernel exposes: /dev/accel* (v2-v4) or VFIO groups (v5e, v5p, v6e)."""
    found = glob.glob("/dev/accel*")
    found += [p for p in glob.glob("/dev/vfio/*") if os.path.basename(p).isdigit()]
    return sorted(found)


def tpu_is_available() -> tuple[bool, str]:
    """A TPU is usable when jax and libtpu are installed and TPU chips are visible."""
    try:
        if not _installed("jax"):
            return False, "jax is not installed: run `pip install 'jax[tpu]'`"
        devices = tpu_device_files()
        if not devices:
            return False, (f"no TPU found here (no /dev/accel* or /dev/vfio devices); "
                           f"{XLA_HINT}. {TORCH_XLA_NOTE}")
        if not (_installed("libtpu") or os.environ.get("TPU_LIBRARY_PATH")):
            return False, ("TPU devices are present but libtpu is not installed: run "
                           "`pip install 'jax[tpu]'`")
        return True, ""
    except Exception as exc:   # never raise: an odd /dev must not break `kvport plugins`
        return False, f"TPU detection failed: {type(exc).__name__}: {exc}; {XLA_HINT}"


def xla_is_available() -> tuple[bool, str]:
    """The XLA platform runs wherever jax is installed (its default backend)."""
    if not _installed("jax"):
        return False, "jax is not installed: run `pip install jax`"
    return True, ""
