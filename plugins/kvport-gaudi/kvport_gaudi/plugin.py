"""Entry point of kvport-gaudi: registers the `hpu` platform and its attention backend.

Cheap to import: detection reads files only (kvport_gaudi.detect); torch and
habana_frameworks load when the platform is selected.
"""
from __future__ import annotations

from kvport.platforms.hookspecs import hookimpl
from kvport_gaudi.detect import gaudi_is_available

# The kvport plugin API versions this plugin supports (see docs/plugins.md, version policy).
KVPORT_PLUGIN_API = ">=1.0,<2"


@hookimpl
def kvport_register_platforms(register):
    """`hpu`: Intel Gaudi through habana_frameworks, after cuda, rocm and tpu."""
    register(name="hpu", device_type="hpu", platform_class="kvport_gaudi.platform:GaudiPlatform",
             is_available=gaudi_is_available, priority=40, framework="torch")


@hookimpl
def kvport_register_attention_backends(register):
    """hpu_flat: flat paged attention with bucketed static shapes (the hpu default)."""
    register(name="hpu_flat", backend_class="kvport_gaudi.attention:GaudiPagedBackend",
             device_types=("hpu",), framework="torch")
