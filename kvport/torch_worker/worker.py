"""TorchWorker: the Worker every torch platform starts from.

A platform plugin subclasses it and overrides `torch_device` and `kv_cache_budget_bytes`
(and anything else its hardware needs); the model runner is shared.
"""
from __future__ import annotations

import logging

import torch

from kvport.attention_backends.interface import AttentionSpec
from kvport.core.worker import ModelRunnerOutput, SchedulerOutput, Worker
from kvport.platforms.interface import DTYPE_BYTES
from kvport.torch_worker.model_runner import TorchModelRunner

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TorchWorker(Worker):
    """Loads a torch model, owns its KV cache, runs steps through TorchModelRunner."""

    def __init__(self, config, model_info, platform, registry):
        super().__init__(config, model_info, platform, registry)
        self.dtype_name = config.model.dtype
        self.dtype = TORCH_DTYPES[self.dtype_name]
        self.device: torch.device | None = None
        self.model = None
        self.attn_backend = None
        self.runner: TorchModelRunner | None = None

    # Hooks for platform subclasses ------------------------------------------------------
    def torch_device(self) -> torch.device:
        """The torch device this worker computes on."""
        return torch.device(self.platform.device_type)

    def kv_cache_budget_bytes(self) -> int:
        """Bytes the KV cache may take; `kv_cache_memory` wins when set."""
        if self.config.cache.kv_cache_memory:
            return int(self.config.cache.kv_cache_memory)
        return int(self.platform.free_memory_bytes() * self.config.cache.gpu_memory_utilization)

    # Worker interface ------------------------------------------------------------------
    def init_device(self) -> None:
        self.device = self.torch_device()
        torch.manual_seed(self.config.model.seed)

    def attention_spec(self) -> AttentionSpec:
        info = self.model_info
        return AttentionSpec(num_heads=info.num_heads, num_kv_heads=info.num_kv_heads,
                             head_size=info.head_size, block_size=self.config.cache.block_size,
                             dtype=self.dtype_name, scale=info.head_size ** -0.5,
                             sliding_window=info.sliding_window)

    def load_model(self) -> None:
        from kvport.models.loader import build_model

        backend_name = (self.config.device.attention_backend
                        or self.platform.default_attention_backend(self.config))
        backend_class = self.registry.attention_backend_class(backend_name,
                                                              self.platform.device_type)
        self.attn_backend = backend_class(self.attention_spec())
        model_class = self.registry.model_class(self.model_info.architecture, framework="torch")
        self.model = build_model(self.model_info, model_class, self.dtype, self.attn_backend,
                                 self.device)
        if self.config.model.quantization:
            from kvport.models.quantization import quantize_model
            replaced = quantize_model(self.model, self.config.model.quantization)
            logger.info("quantized %d linear layers to %s", replaced,
                        self.config.model.quantization)

    def bytes_per_block(self) -> int:
        info = self.model_info
        page = self.attn_backend.page_bytes(self.config.cache.block_size, info.num_kv_heads,
                                            info.head_size, DTYPE_BYTES[self.dtype_name])
        return page * info.num_layers

    def determine_available_kv_blocks(self) -> int:
        return max(self.kv_cache_budget_bytes() // self.bytes_per_block(), 0)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        info = self.model_info
        shape = self.attn_backend.kv_cache_shape(num_blocks, self.config.cache.block_size,
                                                 info.num_kv_heads, info.head_size)
        kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                     for _ in range(info.num_layers)]
        self.runner = TorchModelRunner(self.model, self.attn_backend, kv_caches, self.device,
                                       self.config.cache.block_size, info.vocab_size)

    def warm_up(self) -> None:
        """Nothing to capture or compile in eager torch; graph platforms override this."""

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(scheduler_output)

    def shutdown(self) -> None:
        self.runner = None
        self.model = None
