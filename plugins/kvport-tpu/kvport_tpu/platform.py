"""The `tpu` and `xla` Platforms: one JAX worker, two ways to pick the device.

`tpu` binds to JAX's TPU backend and uses the Pallas kernel; `xla` takes JAX's default
backend (CPU here, CUDA on a GPU host with jax[cuda]) and the jax.numpy attention. jax is
imported here, which only happens once the platform is selected.
"""
from __future__ import annotations

from typing import ClassVar

import jax

from kvport.core.config import EngineConfig
from kvport.platforms.interface import Platform
from kvport_tpu import memory


class JaxPlatform(Platform):
    """What the two platforms share; subclasses name the JAX backend and attention default."""
    jax_backend: ClassVar[str | None] = None      # None: JAX's default backend
    attention_backend: ClassVar[str] = "jax_ragged"

    def device(self):
        """The JAX device the worker runs on (the first of its backend)."""
        return jax.devices(self.jax_backend)[0]

    @property
    def backend_kind(self) -> str:
        """"tpu", "gpu" or "cpu": what the device actually is."""
        return self.device().platform

    def total_memory_bytes(self) -> int:
        return memory.total_bytes(self.device())

    def free_memory_bytes(self) -> int:
        return memory.free_bytes(self.device())

    def supported_dtypes(self) -> tuple[str, ...]:
        if self.backend_kind == "cpu":
            return ("float32", "bfloat16")
        if self.backend_kind == "tpu":
            return ("bfloat16", "float32")
        return ("bfloat16", "float16", "float32")

    def default_dtype(self, checkpoint_dtype: str) -> str:
        # XLA's CPU backend computes bf16 by widening: float32 is faster and exact there.
        return "float32" if self.backend_kind == "cpu" else "bfloat16"

    def distributed_backend(self) -> str:
        return "xla"

    def default_attention_backend(self, config: EngineConfig) -> str:
        return self.attention_backend

    def worker_class(self) -> str:
        return "kvport_tpu.worker:JaxWorker"


class TpuPlatform(JaxPlatform):
    name = "tpu"
    device_type = "tpu"
    jax_backend = "tpu"
    attention_backend = "pallas_ragged"


class XlaPlatform(JaxPlatform):
    """JAX's default backend, for developing and testing the TPU code path anywhere."""
    name = "xla"
    device_type = "xla"
