"""Sizing the KV cache in unified memory.

An Apple Silicon GPU has no memory of its own: it shares the Mac's RAM with the CPU, the OS
and every application. Metal caps what one process's GPU work should hold at
`recommendedMaxWorkingSetSize` (torch.mps.recommended_max_memory(), about two thirds to three
quarters of RAM); what torch's MPS allocator already holds is
torch.mps.driver_allocated_memory(). Without --kv-cache-memory the KV cache takes
gpu_memory_utilization of what is left under Metal's cap after the weights are loaded, and
never more than half the Mac's RAM, which the rest of the machine still needs.
"""
from __future__ import annotations

import os
import subprocess


def unified_memory_bytes() -> int:
    """The Mac's RAM (sysctl hw.memsize), shared by CPU and GPU."""
    try:
        out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
        return int(out.strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_gpu_bytes(recommended_max: int, driver_allocated: int) -> int:
    """What Metal's working-set cap still leaves for this process's GPU memory."""
    return max(int(recommended_max) - int(driver_allocated), 0)


def kv_cache_budget(recommended_max: int, driver_allocated: int, unified: int,
                    utilization: float) -> int:
    """Bytes for the KV cache when the user names no size."""
    return int(min(free_gpu_bytes(recommended_max, driver_allocated) * utilization,
                   unified // 2))
