"""The CPU Platform: memory from the OS, dtype from the CPU's bf16 support, threads from the
cores this process may use."""
from __future__ import annotations

from kvport.core import host_memory
from kvport.core.config import EngineConfig
from kvport.platforms.interface import Platform
from kvport_cpu import cpu_info



class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"

    def total_memory_bytes(self) -> int:
        return cpu_info.total_memory_bytes()

    def free_memory_bytes(self) -> int:
        return cpu_info.available_memory_bytes()

    def supported_dtypes(self) -> tuple[str, ...]:
        if cpu_info.has_native_bf16():
            return ("bfloat16", "float32", "float16")
        return ("float32", "bfloat16", "float16")

    def default_dtype(self, checkpoint_dtype: str) -> str:
        # bf16 only where the CPU multiplies it natively; emulated bf16 is slower than fp32.
        return "bfloat16" if cpu_info.has_native_bf16() else "float32"

    def supported_quantizations(self) -> tuple[str, ...]:
        from kvport.models.quantization import int8_matmul_available
        return ("int8",) if int8_matmul_available() else ()

    def distributed_backend(self) -> str:
        return "gloo"

    def default_attention_backend(self, config: EngineConfig) -> str:
        # Batched paged attention on torch's fused CPU kernel (kvport_cpu.attention); checked
        # against torch_reference by tests/test_cpu_attention.py.
        return "cpu_paged"

    def worker_class(self) -> str:
        return "kvport_cpu.worker:CpuWorker"

    def check_and_update_config(self, config: EngineConfig) -> None:
        super().check_and_update_config(config)
        if config.device.num_threads is None:
            config.device.num_threads = cpu_info.usable_cores()

    def default_kv_cache_bytes(self) -> int:
        return host_memory.default_kv_cache_bytes()
