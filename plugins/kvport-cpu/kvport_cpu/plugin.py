"""Entry point of kvport-cpu: registers the CPU platform and its attention backend
(cpu_paged) through kvport's hooks.

Cheap to import: no torch here. torch is imported only once the CPU platform is selected.
"""
from __future__ import annotations

import importlib.util

from kvport.platforms.hookspecs import hookimpl

# The kvport plugin API versions this plugin supports (see docs/plugins.md, version policy).
KVPORT_PLUGIN_API = ">=1.0,<2"


def cpu_is_available() -> tuple[bool, str]:
    """A CPU is always there; what can be missing is torch."""
    if importlib.util.find_spec("torch") is None:
        return False, "torch is not installed: run `pip install torch`"
    return True, ""


@hookimpl
def kvport_register_platforms(register):
    register(name="cpu", device_type="cpu", platform_class="kvport_cpu.platform:CpuPlatform",
             is_available=cpu_is_available, priority=100)


@hookimpl
def kvport_register_attention_backends(register):
    """cpu_paged: batched paged attention on torch's fused CPU kernel (the CPU default)."""
    register(name="cpu_paged", backend_class="kvport_cpu.attention:CpuPagedAttentionBackend",
             device_types=("cpu",))
