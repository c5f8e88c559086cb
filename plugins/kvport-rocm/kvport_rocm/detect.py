"""Is there an AMD GPU and a ROCm build of torch? Answered without importing torch or HIP.

* the torch build is read from torch/version.py (`hip` is set in ROCm builds), as kvport-cuda
  does for CUDA;
* GPUs are counted from the ROCm kernel driver's topology in sysfs: every node with SIMD units
  is a GPU (CPU nodes report `simd_count 0`), and /dev/kfd must exist for a process to use them.
"""
from __future__ import annotations

import importlib.util
import os

from kvport_cuda import detect as cuda_detect

KFD_DEVICE = "/dev/kfd"
KFD_TOPOLOGY = "/sys/class/kfd/kfd/topology/nodes"
VISIBILITY_VARIABLES = ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")
ROCM_TORCH_HINT = ("install a ROCm build of PyTorch, e.g. `pip install torch --index-url "
                   "https://download.pytorch.org/whl/rocm6.4`")


def amd_gpu_count(topology: str = KFD_TOPOLOGY) -> int:
    """GPU nodes (simd_count > 0) in the KFD topology; 0 when there is none or no driver."""
    if not os.path.isdir(topology):
        return 0
    count = 0
    for node in os.listdir(topology):
        try:
            with open(os.path.join(topology, node, "properties"), encoding="ascii") as f:
                props = dict(line.split(None, 1) for line in f if line.strip())
        except (OSError, ValueError):
            continue
        if int(props.get("simd_count", "0").strip() or 0) > 0:
            count += 1
    return count


def rocm_is_available(kfd_device: str = KFD_DEVICE,
                      topology: str = KFD_TOPOLOGY) -> tuple[bool, str]:
    """(available, reason) for the `rocm` platform. Never raises."""
    try:
        build = cuda_detect.installed_torch_build()
        if build is None:
            return False, f"torch is not installed: {ROCM_TORCH_HINT}"
        if not build.hip:
            kind = f"a CUDA {build.cuda} build" if build.cuda else "a build without GPU support"
            return False, (f"the installed torch {build.version} is {kind}, not a ROCm (HIP) "
                           f"build: {ROCM_TORCH_HINT}")
        if importlib.util.find_spec("triton") is None:
            return False, ("triton is not installed (PyTorch's ROCm wheels bring it as "
                           "pytorch-triton-rocm)")
        hidden = cuda_detect.hidden_by_env(VISIBILITY_VARIABLES)
        if hidden:
            return False, hidden
        if not os.path.exists(kfd_device):
            return False, f"no AMD GPU driver: {kfd_device} does not exist (is amdgpu loaded?)"
        count = amd_gpu_count(topology)
        if count == 0:
            return False, f"the ROCm driver reports no GPU (no GPU node in {topology})"
        return True, f"{count} AMD GPU(s); torch {build.version} (HIP {build.hip})"
    except Exception as exc:     # the contract: report, never raise
        return False, f"ROCm detection failed: {type(exc).__name__}: {exc}"
