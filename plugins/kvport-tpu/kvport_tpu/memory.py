"""Device memory as JAX reports it, with a documented fallback for JAX's CPU backend.

TPU and GPU devices report `memory_stats()`: `bytes_limit` (what JAX's allocator may use;
on GPUs 75% of the card unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise) and
`bytes_in_use`. The CPU backend reports nothing, so there the host's memory stands in
(/proc/meminfo), and the KV cache defaults to min(4 GiB, a quarter of available memory), as
in the CPU plugin.
"""
from __future__ import annotations

from kvport.core import host_memory


def device_stats(device) -> dict | None:
    """The device's memory stats, or None where the backend keeps none (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:   # some backends raise instead of returning None; both mean "none"
        return None
    return stats if stats and "bytes_limit" in stats else None


def total_bytes(device) -> int:
    stats = device_stats(device)
    return int(stats["bytes_limit"]) if stats else host_memory.total_memory_bytes()


def free_bytes(device) -> int:
    stats = device_stats(device)
    if stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return host_memory.available_memory_bytes()


def kv_cache_budget(device, utilization: float, reserve_bytes: int) -> int:
    """Bytes the KV cache may take: `utilization` of the device limit, minus what is in use
    (the weights) and `reserve_bytes` for a step's activations; CPU: the fallback above."""
    stats = device_stats(device)
    if not stats:
        return host_memory.default_kv_cache_bytes()
    limit = int(stats["bytes_limit"]) * utilization
    return max(int(limit) - int(stats.get("bytes_in_use", 0)) - reserve_bytes, 0)
