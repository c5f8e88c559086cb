"""The CPU worker: the shared torch worker, with threads and a memory-budget KV cache."""
from __future__ import annotations

import torch

from kvport.torch_worker.worker import TorchWorker


class CpuWorker(TorchWorker):

    def torch_device(self) -> torch.device:
        return torch.device("cpu")

    def init_device(self) -> None:
        super().init_device()
        torch.set_num_threads(self.config.device.num_threads)

    def kv_cache_budget_bytes(self) -> int:
        if self.config.cache.kv_cache_memory:
            return int(self.config.cache.kv_cache_memory)
        return self.platform.default_kv_cache_bytes()
