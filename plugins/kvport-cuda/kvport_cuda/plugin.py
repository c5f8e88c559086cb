"""Entry point of kvport-cuda: registers the `cuda` platform and the `triton_paged` attention
backend through kvport's hooks.

Cheap to import: no torch, no triton, no CUDA here. Availability is read from files and the
NVIDIA driver's NVML library (kvport_cuda.detect); torch and Triton load only once the
platform is selected.
"""
from __future__ import annotations

from kvport.platforms.hookspecs import hookimpl
from kvport_cuda.detect import cuda_is_available

# The kvport plugin API versions this plugin supports (see docs/plugins.md, version policy).
KVPORT_PLUGIN_API = ">=1.0,<2"


@hookimpl
def kvport_register_platforms(register):
    """`cuda`: NVIDIA GPUs, tried first when no device is named."""
    register(name="cuda", device_type="cuda", platform_class="kvport_cuda.platform:CudaPlatform",
             is_available=cuda_is_available, priority=10, framework="torch")


@hookimpl
def kvport_register_attention_backends(register):
    """triton_paged: Triton paged attention (split-KV decode, mixed batches), the CUDA default."""
    register(name="triton_paged",
             backend_class="kvport.attention_backends.triton_paged:TritonPagedAttentionBackend",
             device_types=("cuda",), framework="torch")
