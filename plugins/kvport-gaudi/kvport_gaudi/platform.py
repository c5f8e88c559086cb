"""The Gaudi Platform: habana_frameworks' HPU device, bf16 (Gaudi's native matrix type),
HCCL for collectives, hpu_flat attention. Never run on Gaudi hardware (README.md)."""
from __future__ import annotations

import importlib

from kvport.core.config import EngineConfig
from kvport.platforms.interface import Platform


def load_hpu_runtime():
    """Import habana_frameworks.torch (which registers the `hpu` device with torch) and
    return its `hpu` module: is_available, mem_get_info, get_device_name, graphs."""
    importlib.import_module("habana_frameworks.torch")
    return importlib.import_module("habana_frameworks.torch.hpu")


class GaudiPlatform(Platform):
    """Intel Gaudi 2 / 3 through Intel's PyTorch bridge (habana_frameworks)."""
    name = "hpu"
    device_type = "hpu"
    attention_backend = "hpu_flat"

    def __init__(self) -> None:
        self.hpu = load_hpu_runtime()
        if not self.hpu.is_available():
            raise RuntimeError("hpu: habana_frameworks sees no Gaudi "
                               "(habana_frameworks.torch.hpu.is_available() is False)")

    def total_memory_bytes(self) -> int:
        return int(self.hpu.mem_get_info()[1])

    def free_memory_bytes(self) -> int:
        return int(self.hpu.mem_get_info()[0])

    def supported_dtypes(self) -> tuple[str, ...]:
        # bf16 is the MME's native type; float16 is not offered (first-generation Gaudi
        # lacks it, and nothing here has checked it on Gaudi 2/3).
        return ("bfloat16", "float32")

    def default_dtype(self, checkpoint_dtype: str) -> str:
        return "bfloat16"

    def distributed_backend(self) -> str:
        return "hccl"

    def default_attention_backend(self, config: EngineConfig) -> str:
        return self.attention_backend

    def worker_class(self) -> str:
        return "kvport_gaudi.worker:GaudiWorker"

    def device_name(self) -> str:
        """The accelerator's name (e.g. "GAUDI2"), for logs and benchmark records."""
        return str(self.hpu.get_device_name())
