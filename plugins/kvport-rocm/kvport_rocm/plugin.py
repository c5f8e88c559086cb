"""Entry point of kvport-rocm: registers the `rocm` platform and its attention backend.

Cheap to import: detection reads files only (kvport_rocm.detect); torch loads on selection.
"""
from __future__ import annotations

from kvport.platforms.hookspecs import hookimpl
from kvport_rocm.detect import rocm_is_available

# The kvport plugin API versions this plugin supports (see docs/plugins.md, version policy).
KVPORT_PLUGIN_API = ">=1.0,<2"


@hookimpl
def kvport_register_platforms(register):
    """`rocm`: AMD GPUs through PyTorch's ROCm build, after cuda in auto-selection."""
    register(name="rocm", device_type="rocm", platform_class="kvport_rocm.platform:RocmPlatform",
             is_available=rocm_is_available, priority=20, framework="torch")


@hookimpl
def kvport_register_attention_backends(register):
    """triton_paged_rocm: kvport's Triton paged attention with ROCm launch defaults."""
    register(name="triton_paged_rocm",
             backend_class="kvport_rocm.attention:RocmTritonPagedBackend",
             device_types=("rocm",), framework="torch")
