"""What this CPU offers: usable cores, memory, and native bf16 arithmetic."""
from __future__ import annotations

import os

from kvport.core.host_memory import available_memory_bytes, total_memory_bytes  # noqa: F401


def usable_cores() -> int:
    """Cores this process may run on (affinity and cgroup-limited sets included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_native_bf16(flags: set[str] | None = None) -> bool:
    """True where bf16 matrix math is native: AVX512-BF16 or AMX on x86, BF16 on Arm."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
