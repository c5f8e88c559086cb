"""A description of the machine a benchmark ran on, for the JSON results."""
from __future__ import annotations

import datetime
import os
import platform


def _cpu_model() -> str:
    # platform.processor() is often empty on Linux; /proc/cpuinfo names the CPU.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def machine_info() -> dict:
    try:
        nproc = len(os.sched_getaffinity(0))   # what `nproc` prints: the usable cores
    except AttributeError:
        nproc = os.cpu_count()
    return {"processor": platform.processor(), "cpu_model": _cpu_model(), "nproc": nproc,
            "platform": platform.platform(), "python": platform.python_version()}


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
