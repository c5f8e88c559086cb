"""Entry point of kvport-mps: registers the `mps` platform and its attention backend.

Cheap to import: detection reads the OS and the CPU architecture (kvport_mps.detect); torch
loads when the platform is selected.
"""
from __future__ import annotations

from kvport.platforms.hookspecs import hookimpl
from kvport_mps.detect import mps_is_available

# The kvport plugin API versions this plugin supports (see docs/plugins.md, version policy).
KVPORT_PLUGIN_API = ">=1.0,<2"


@hookimpl
def kvport_register_platforms(register):
    """`mps`: Apple Silicon GPUs through PyTorch's Metal backend, before the CPU."""
    register(name="mps", device_type="mps", platform_class="kvport_mps.platform:MpsPlatform",
             is_available=mps_is_available, priority=60, framework="torch")


@hookimpl
def kvport_register_attention_backends(register):
    """mps_sdpa: paged attention as two batched SDPA calls per step (the mps default)."""
    register(name="mps_sdpa", backend_class="kvport_mps.attention:MpsSdpaBackend",
             device_types=("mps",), framework="torch")
