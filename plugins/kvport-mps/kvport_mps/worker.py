"""The MPS worker: the shared torch worker on the Mac's GPU, its KV cache sized from unified
memory."""
from __future__ import annotations

import torch

from kvport.torch_worker.worker import TorchWorker


class MpsWorker(TorchWorker):

    def torch_device(self) -> torch.device:
        return torch.device("mps")

    def kv_cache_budget_bytes(self) -> int:
        if self.config.cache.kv_cache_memory:
            return int(self.config.cache.kv_cache_memory)
        return self.platform.kv_cache_budget_bytes(self.config.cache.gpu_memory_utilization)
