"""The host's memory, read without any framework: for platforms whose device memory is the
host's (CPU) or that fall back to it (JAX's CPU backend)."""
from __future__ import annotations

import os

# With no --kv-cache-memory: this much, but never more than a quarter of available memory.
DEFAULT_HOST_KV_CACHE_BYTES = 4 * 2**30


def _meminfo_bytes(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def total_memory_bytes() -> int:
    """Physical memory of the host, in bytes."""
    total = _meminfo_bytes("MemTotal")
    return total if total is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory_bytes() -> int:
    """Memory the host can still give out (MemAvailable), in bytes."""
    available = _meminfo_bytes("MemAvailable")
    if available is not None:
        return available
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def default_kv_cache_bytes() -> int:
    """The KV cache a host-memory platform takes when the user names no size."""
    return min(DEFAULT_HOST_KV_CACHE_BYTES, available_memory_bytes() // 4)
