"""TorchWorker: the Worker every torch platform starts from.

A platform plugin subclasses it and overrides `torch_device` and `kv_cache_budget_bytes`
(and anything else its hardware needs); the model runner is shared.

Tensor parallelism: the executor (kvport/core/executor.py) builds one TorchWorker per rank,
each in its own process, with that rank's `TensorParallelRank`. The worker binds its device
through the Platform, joins the torch.distributed group, loads its slice of the model and
sizes a KV cache of its own KV heads only; rank 0 samples for the group (TorchModelRunner).
"""
from __future__ import annotations

import logging

import torch

from kvport.attention_backends.interface import AttentionSpec
from kvport.core.config import ConfigError
from kvport.core.tensor_parallel import SINGLE_RANK, HeadShard, TensorParallelRank
from kvport.core.worker import ModelRunnerOutput, PendingOutput, SchedulerOutput, Worker
from kvport.models.tp_group import SINGLE_GROUP
from kvport.platforms.interface import DTYPE_BYTES
from kvport.torch_worker.distributed import destroy_tensor_parallel, init_tensor_parallel
from kvport.torch_worker.model_runner import TorchModelRunner

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TorchWorker(Worker):
    """Loads a torch model, owns its KV cache, runs steps through TorchModelRunner.

    `parallel` places the worker in a tensor-parallel group (the executor passes it; the
    default is a group of one).
    """
    # The multiprocess executor may run one of these per tensor-parallel rank.
    supports_tensor_parallel = True

    def __init__(self, config, model_info, platform, registry,
                 parallel: TensorParallelRank = SINGLE_RANK):
        super().__init__(config, model_info, platform, registry)
        self.parallel = parallel
        self.tp = SINGLE_GROUP
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

    def quantization_kernels(self, method: str):
        """The platform's own kernels for a quantization scheme (e.g. Int8RowKernels for
        int8), or None for the portable torch ops; default None."""
        return None

    def invariant_matmul(self):
        """The platform's shape-invariant matmul for `ParallelConfig.tp_invariant`
        (kvport.models.invariant.InvariantMatmul), or None where it has none; default None.
        A platform returning one also answers True to `Platform.supports_tp_invariant`."""
        return None

    def activate_device(self) -> None:
        """Make `self.device` this process's current device (CUDA: set_device); default
        nothing."""

    @property
    def heads(self) -> HeadShard:
        """The attention heads this worker computes (all of them without tensor parallelism)."""
        info = self.model_info
        return HeadShard.of(info.num_heads, info.num_kv_heads, self.parallel.world_size,
                            self.parallel.rank)

    # Worker interface ------------------------------------------------------------------
    def init_device(self) -> None:
        if self.parallel.world_size > 1:
            # before anything touches a device: the platform picks this rank's device
            self.platform.bind_tensor_parallel_rank(self.parallel.rank, self.parallel.world_size)
        self.device = self.torch_device()
        self.activate_device()
        torch.manual_seed(self.config.model.seed)
        self.tp = init_tensor_parallel(self.parallel, self.device)
        if self.tp.world_size > 1:           # never the shared one-rank group
            self.tp.reduce_in_float32 = self.config.parallel.tp_reduce_dtype == "float32"

    def attention_spec(self) -> AttentionSpec:
        info, heads = self.model_info, self.heads
        return AttentionSpec(num_heads=heads.num_heads, num_kv_heads=heads.num_kv_heads,
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
        model_kwargs = {}
        if self.tp.world_size > 1:
            if not getattr(model_class, "supports_tensor_parallel", False):
                raise ConfigError(f"tensor_parallel_size {self.tp.world_size}: the model class "
                                  f"{model_class.__name__} ({self.model_info.architecture}) "
                                  "has no tensor-parallel form")
            model_kwargs["tp"] = self.tp
        self.model = build_model(self.model_info, model_class, self.dtype, self.attn_backend,
                                 self.device, model_kwargs=model_kwargs)
        if self.config.parallel.tp_invariant:
            self._make_tp_invariant()
        if self.config.model.quantization:
            from kvport.models.quantization import quantize_model
            method = self.config.model.quantization
            replaced = quantize_model(self.model, method, self.quantization_kernels(method))
            logger.info("quantized %d linear layers to %s", replaced, method)

    def _make_tp_invariant(self) -> None:
        from kvport.models.invariant import make_tp_invariant
        matmul = self.invariant_matmul()
        if matmul is None:
            raise ConfigError(f"tp_invariant: the {self.platform.device_type} worker has no "
                              "shape-invariant matmul")
        counts = make_tp_invariant(self.model, matmul, self.tp)
        logger.info("tp_invariant: %d column-parallel and %d row-parallel layers and the LM "
                    "head on the shape-invariant matmul", counts["column"], counts["row"])

    def bytes_per_block(self) -> int:
        """KV bytes of one block over all layers, for this worker's KV heads."""
        info = self.model_info
        page = self.attn_backend.page_bytes(self.config.cache.block_size,
                                            self.heads.num_kv_heads, info.head_size,
                                            DTYPE_BYTES[self.dtype_name])
        return page * info.num_layers

    def determine_available_kv_blocks(self) -> int:
        return max(self.kv_cache_budget_bytes() // self.bytes_per_block(), 0)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        info = self.model_info
        shape = self.attn_backend.kv_cache_shape(num_blocks, self.config.cache.block_size,
                                                 self.heads.num_kv_heads, info.head_size)
        kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                     for _ in range(info.num_layers)]
        self.runner = TorchModelRunner(self.model, self.attn_backend, kv_caches, self.device,
                                       self.config.cache.block_size, info.vocab_size,
                                       tp=self.tp)

    def warm_up(self) -> None:
        """Nothing to capture or compile in eager torch; graph platforms override this."""

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(scheduler_output)

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> PendingOutput:
        return self.runner.execute_async(scheduler_output)

    def shutdown(self) -> None:
        self.runner = None
        self.model = None
        destroy_tensor_parallel(self.tp)
        self.tp = SINGLE_GROUP
