"""The CUDA Platform: memory from the driver, bf16 where the GPU computes it (compute
capability 8.0, Ampere, and later), fp16 elsewhere, NCCL for collectives."""
from __future__ import annotations

import torch

from kvport.core.config import EngineConfig
from kvport.platforms.interface import Platform


class CudaPlatform(Platform):
    """NVIDIA GPUs through PyTorch's CUDA build. kvport-rocm subclasses it for AMD GPUs."""
    name = "cuda"
    device_type = "cuda"
    attention_backend = "triton_paged"

    def __init__(self) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError(f"{self.name}: torch {torch.__version__} sees no GPU "
                               "(torch.cuda.is_available() is False)")
        self.device_index = torch.cuda.current_device()

    def total_memory_bytes(self) -> int:
        return torch.cuda.mem_get_info(self.device_index)[1]

    def free_memory_bytes(self) -> int:
        return torch.cuda.mem_get_info(self.device_index)[0]

    def has_native_bf16(self) -> bool:
        """bf16 matrix math in hardware: compute capability 8.0 (Ampere) and later."""
        return torch.cuda.get_device_capability(self.device_index) >= (8, 0)

    def supported_dtypes(self) -> tuple[str, ...]:
        if self.has_native_bf16():
            return ("bfloat16", "float16", "float32")
        return ("float16", "float32")

    def default_dtype(self, checkpoint_dtype: str) -> str:
        # float16 checkpoints stay float16 (bf16 would drop mantissa bits they were trained
        # with); everything else runs in bf16, or float16 where bf16 is missing.
        if checkpoint_dtype == "float16" or not self.has_native_bf16():
            return "float16"
        return "bfloat16"

    def distributed_backend(self) -> str:
        return "nccl"

    def supports_tp_invariant(self) -> bool:
        """kvport_cuda/invariant_matmul.py: fixed tiles, no split-K (checked on Hopper)."""
        return True

    def bind_tensor_parallel_rank(self, rank: int, world_size: int) -> None:
        """Rank r computes on GPU r of this host (as CUDA_VISIBLE_DEVICES numbers them)."""
        from kvport.core.config import ConfigError
        count = torch.cuda.device_count()
        if world_size > count:
            raise ConfigError(f"tensor_parallel_size {world_size} needs {world_size} GPUs on "
                              f"this host; torch sees {count}")
        self.device_index = rank
        torch.cuda.set_device(rank)

    def default_attention_backend(self, config: EngineConfig) -> str:
        return self.attention_backend

    def worker_class(self) -> str:
        return "kvport_cuda.worker:CudaWorker"

    def device_name(self) -> str:
        """Marketing name of the GPU, for logs and benchmark records."""
        return torch.cuda.get_device_name(self.device_index)
