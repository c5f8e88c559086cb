"""The CPU worker: the shared torch worker, with threads and a memory-budget KV cache.

Tensor parallelism on a CPU (gloo collectives, every rank on the same cores) is a
correctness vehicle, not a speed-up: it runs the sharded model code where CI can test it."""
from __future__ import annotations

import logging

import torch

from kvport.torch_worker.worker import TorchWorker

logger = logging.getLogger(__name__)


class CpuWorker(TorchWorker):

    def torch_device(self) -> torch.device:
        return torch.device("cpu")

    def init_device(self) -> None:
        super().init_device()
        # The ranks of a tensor-parallel group share this host's cores: num_threads in all.
        torch.set_num_threads(max(1, self.config.device.num_threads // self.parallel.world_size))

    # All-decode steps run through the native decoder where the model qualifies
    # (kvport_cpu/native_decoder.py); False keeps them on the model's modules (tests compare).
    use_native_decoder: bool = True

    def quantization_kernels(self, method: str):
        """int8: the native layer (csrc/int8_rows.cpp: quantize, int8 product, rescale)
        where it builds; otherwise the torch ops, and the log says why."""
        if method != "int8":
            return None
        from kvport.models.quantization import Int8RowKernels
        from kvport_cpu.native import int8_linear_op, int8_row_ops
        native = int8_row_ops()
        if native.op is None:
            logger.info("int8 layers: torch ops for quantize/rescale (native kernels "
                        "unavailable: %s)", native.reason)
            return None
        logger.info("int8 layers: native kernels")
        return Int8RowKernels(quantize=native.op, rescale=native.out,
                              linear=int8_linear_op().op)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """The shared cache and runner; the runner's model then runs all-decode steps on the
        native decoder where the model qualifies (the log says which path and why)."""
        super().initialize_kv_cache(num_blocks)
        if not self.use_native_decoder:
            logger.info("decode steps: the model's modules (use_native_decoder is False)")
            return
        from kvport_cpu.native_decoder import NativeDecodeModel, native_decoder_for
        choice = native_decoder_for(self.model, self.attn_backend)
        if choice.decoder is None:
            logger.info("decode steps: the model's modules (%s)", choice.reason)
            return
        logger.info("decode steps: the native decoder (%d layers in one call)",
                    choice.decoder.num_layers())
        self.runner.model = NativeDecodeModel(self.model, choice.decoder)

    def warm_up(self) -> None:
        """Build or load the attention backend's native decode kernel now (the first build
        takes tens of seconds on a small machine), so that no request's first step waits on
        it; cpu_paged logs which decode path it took."""
        getattr(self.attn_backend, "decode_path", None)

    def kv_cache_budget_bytes(self) -> int:
        """`kv_cache_memory` (or the platform's default) for the whole model: tensor-parallel
        ranks share the host's memory, so each takes its part."""
        if self.config.cache.kv_cache_memory:
            total = int(self.config.cache.kv_cache_memory)
        else:
            total = self.platform.default_kv_cache_bytes()
        return total // self.parallel.world_size
