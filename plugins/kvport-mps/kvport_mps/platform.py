"""The MPS Platform: Apple Silicon GPUs through PyTorch's Metal backend. Memory is the Mac's
unified memory under Metal's working-set cap (memory.py), dtypes follow the macOS version
(capabilities.py). Never run on a Mac (README.md)."""
from __future__ import annotations

import platform as host

import torch

from kvport.core.config import ConfigError, EngineConfig
from kvport.platforms.interface import Platform
from kvport_mps import capabilities, memory
from kvport_mps.detect import parse_version


class MpsPlatform(Platform):
    name = "mps"
    device_type = "mps"
    attention_backend = "mps_sdpa"

    def __init__(self) -> None:
        if not torch.backends.mps.is_available():
            built = torch.backends.mps.is_built()
            raise RuntimeError(
                f"mps: torch {torch.__version__} cannot use the GPU "
                f"(torch.backends.mps.is_available() is False; is_built() is {built}"
                + ("" if built else ": this torch build has no MPS support") + ")")
        self.macos = parse_version(host.mac_ver()[0])

    def total_memory_bytes(self) -> int:
        return int(torch.mps.recommended_max_memory())

    def free_memory_bytes(self) -> int:
        return memory.free_gpu_bytes(torch.mps.recommended_max_memory(),
                                     torch.mps.driver_allocated_memory())

    def kv_cache_budget_bytes(self, utilization: float) -> int:
        """The KV cache's share of unified memory (see memory.py)."""
        return memory.kv_cache_budget(torch.mps.recommended_max_memory(),
                                      torch.mps.driver_allocated_memory(),
                                      memory.unified_memory_bytes(), utilization)

    def supported_dtypes(self) -> tuple[str, ...]:
        return capabilities.supported_dtypes(self.macos)

    def default_dtype(self, checkpoint_dtype: str) -> str:
        return capabilities.default_dtype(checkpoint_dtype, self.macos)

    def check_and_update_config(self, config: EngineConfig) -> None:
        reason = capabilities.why_unsupported(config.model.dtype, self.macos)
        if config.model.dtype != "auto" and reason is not None:
            raise ConfigError(f"dtype {config.model.dtype}: {reason}")
        super().check_and_update_config(config)

    def distributed_backend(self) -> str:
        # One GPU per Mac: nothing to reduce across; gloo serves the CPU-side collectives.
        return "gloo"

    def default_attention_backend(self, config: EngineConfig) -> str:
        return self.attention_backend

    def worker_class(self) -> str:
        return "kvport_mps.worker:MpsWorker"
