"""The CUDA worker: the shared torch worker on a GPU, with a profiled KV cache budget, the
CUDA model runner, and decode graphs captured at warm-up."""
from __future__ import annotations

import logging

import torch

from kvport.attention_backends.triton_paged import TritonPagedAttentionBackend
from kvport.core.config import ConfigError
from kvport.torch_worker.model_runner import TorchModelRunner
from kvport.torch_worker.worker import TorchWorker
from kvport_cuda.all_reduce_norm import AllReduceNorm
from kvport_cuda.fused_elementwise import fuse_elementwise
from kvport_cuda.fused_norm import fuse_rms_norms
from kvport_cuda.fused_tp_layers import can_fuse_all_reduce_norms, fuse_all_reduce_norms
from kvport_cuda.graphs import default_batch_sizes
from kvport_cuda.memory import MemoryProfile, profile_memory
from kvport_cuda.model_runner import CudaModelRunner
from kvport_cuda.symmetric_all_reduce import (SymmetricMemoryAllReduce,
                                              symmetric_all_reduce_or_reason)

logger = logging.getLogger(__name__)


class CudaWorker(TorchWorker):
    """Runs the model on one GPU (the platform's current device)."""

    memory_profile: MemoryProfile | None = None

    def torch_device(self) -> torch.device:
        return torch.device("cuda", self.platform.device_index)

    def activate_device(self) -> None:
        torch.cuda.set_device(self.device)

    def init_device(self) -> None:
        super().init_device()
        if self.tp.world_size > 1 and self.config.parallel.custom_all_reduce:
            self._use_symmetric_all_reduce()

    def _use_symmetric_all_reduce(self) -> None:
        """Decode-sized all-reduces through symmetric memory (every rank runs this)."""
        fast, reason = symmetric_all_reduce_or_reason(self.device, self.dtype,
                                                      self.tp.world_size)
        if fast is None:
            logger.warning("tensor-parallel all-reduce: NCCL for every size (%s); "
                           "--no-custom-all-reduce silences this", reason)
            return
        self.tp.fast_all_reduce = fast
        logger.info("tensor-parallel all-reduce: %s up to %d KiB, NCCL above", reason,
                    fast.limits.max_bytes // 1024)

    def invariant_matmul(self):
        """kvport_cuda/invariant_matmul.py's fixed-tile Triton matmul."""
        from kvport_cuda.invariant_matmul import invariant_linear
        return invariant_linear

    def load_model(self) -> None:
        super().load_model()
        if self.config.parallel.tp_invariant:
            self._keep_attention_invariant()
        fused = fuse_rms_norms(self.model)
        counts = fuse_elementwise(self.model)
        logger.info("Triton kernels swapped in: %d RMSNorm layers (with their residual adds), "
                    "%d rotary rotations, %d silu x up", fused, counts["rotary"],
                    counts["silu_and_mul"])
        self._fuse_all_reduce_norms()

    def _keep_attention_invariant(self) -> None:
        """Under tp_invariant the split-KV choice must not see this rank's share of the heads
        (each split count combines partial softmaxes into other bits)."""
        if not isinstance(self.attn_backend, TritonPagedAttentionBackend):
            raise ConfigError(f"tp_invariant: attention backend {self.attn_backend.name!r} is "
                              "not known to compute a head alike at every tensor-parallel "
                              "size; use triton_paged")
        self.attn_backend.split_kv_heads = self.model_info.num_kv_heads

    def _fuse_all_reduce_norms(self) -> None:
        """Under tensor parallelism with the symmetric-memory all-reduce: each row-parallel
        matmul's sum, the residual add and the norm after it in one kernel (every rank runs
        this, in the same order: it allocates shared memory collectively)."""
        fast = self.tp.fast_all_reduce
        if (self.tp.world_size == 1 or not isinstance(fast, SymmetricMemoryAllReduce)
                or self.tp.reduce_in_float32 or fast.dtype != self.dtype
                or self.config.parallel.tp_invariant):
            return
        if not can_fuse_all_reduce_norms(self.model):
            logger.info("tensor-parallel all-reduce not fused with the norms: %s is not a "
                        "Llama-family model in the layout the fusion relies on",
                        type(self.model).__name__)
            return
        fused = AllReduceNorm(fast, int(self.model_info.hf_config["hidden_size"]))
        pairs = fuse_all_reduce_norms(self.model, fused)
        logger.info("tensor-parallel all-reduce fused with the residual add and RMSNorm after "
                    "%d row-parallel matmuls (up to %d rows per step)", pairs, fused.max_rows)

    def determine_available_kv_blocks(self) -> int:
        """`kv_cache_memory` when set; else gpu_memory_utilization x the GPU's memory, less
        the weights, the measured peak of the largest step and what PyTorch does not own."""
        if self.config.cache.kv_cache_memory:
            return super().determine_available_kv_blocks()
        info, cache = self.model_info, self.config.cache
        profile = profile_memory(
            self.model, self.attn_backend,
            lambda n: self.attn_backend.kv_cache_shape(n, cache.block_size,
                                                       self.heads.num_kv_heads, info.head_size),
            self.dtype, info.num_layers, info.vocab_size, self.device,
            self.config.scheduler.max_num_batched_tokens, self.config.scheduler.max_num_seqs,
            cache.block_size, cache.gpu_memory_utilization)
        self.memory_profile = profile
        logger.info("%s", profile.describe())
        return profile.kv_cache // self.bytes_per_block()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        info, cache = self.model_info, self.config.cache
        shape = self.attn_backend.kv_cache_shape(num_blocks, cache.block_size,
                                                 self.heads.num_kv_heads, info.head_size)
        kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                     for _ in range(info.num_layers)]
        if isinstance(self.attn_backend, TritonPagedAttentionBackend):
            self.runner = CudaModelRunner(
                self.model, self.attn_backend, kv_caches, self.device, cache.block_size,
                info.vocab_size, max_num_seqs=self.config.scheduler.max_num_seqs,
                max_model_len=self.config.model.max_model_len, tp=self.tp)
        else:
            logger.info("attention backend %r has no device-side metadata: running the shared "
                        "torch runner (no CUDA graphs)", self.attn_backend.name)
            self.runner = TorchModelRunner(self.model, self.attn_backend, kv_caches,
                                           self.device, cache.block_size, info.vocab_size,
                                           tp=self.tp)

    def prefers_async_scheduling(self) -> bool:
        """The CUDA runner returns before the GPU finishes: overlap pays."""
        return isinstance(self.runner, CudaModelRunner)

    def warm_up(self) -> None:
        """Capture the decode CUDA graphs (unless enforce_eager or another runner)."""
        if self.config.device.enforce_eager or not isinstance(self.runner, CudaModelRunner):
            return
        self.runner.capture_graphs(default_batch_sizes(self.config.scheduler.max_num_seqs))

    def shutdown(self) -> None:
        super().shutdown()
        torch.cuda.empty_cache()
