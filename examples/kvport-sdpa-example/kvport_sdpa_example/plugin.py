"""Entry point of kvport-sdpa-example. It provides no platform: it adds one attention backend
to the CPU platform that kvport-cpu provides, selectable by name:

    kvport serve --device cpu --attention-backend cpu_sdpa

Cheap to import (no torch): kvport imports every plugin's entry point at start-up.
"""
from __future__ import annotations

from kvport.platforms.hookspecs import hookimpl

KVPORT_PLUGIN_API = ">=1.0,<2"


@hookimpl
def kvport_register_attention_backends(register):
    register(name="cpu_sdpa", backend_class="kvport_sdpa_example.attention:SdpaAttentionBackend",
             device_types=("cpu",), framework="torch")
