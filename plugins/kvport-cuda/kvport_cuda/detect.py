"""What this machine offers a GPU platform, found without importing torch or creating a CUDA
context: the registry calls these checks in every process that selects a platform (the API
server too), and a CUDA context made there would hold GPU memory and break a later fork.

* the installed torch build is read from torch/version.py as text (never imported);
* NVIDIA GPUs are counted through NVML (libnvidia-ml, loaded with ctypes), which, unlike the
  CUDA runtime, makes no context.
kvport-rocm reuses `installed_torch_build`.
"""
from __future__ import annotations

import ast
import ctypes
import importlib.util
import os
import sys
from dataclasses import dataclass

NVML_LIBRARIES = ("nvml.dll",) if sys.platform == "win32" else ("libnvidia-ml.so.1",
                                                                  "libnvidia-ml.so")
CUDA_TORCH_HINT = ("install a CUDA build of PyTorch, e.g. `pip install torch --index-url "
                   "https://download.pytorch.org/whl/cu128`")


@dataclass(frozen=True)
class TorchBuild:
    """The versions torch/version.py declares: `cuda` / `hip` are None in other builds."""
    version: str
    cuda: str | None
    hip: str | None


def read_torch_build(version_file: str) -> TorchBuild:
    """Parse torch/version.py (module-level `name = 'value'` assignments) without running it."""
    with open(version_file, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=version_file)
    values: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name) and isinstance(value, ast.Constant):
            values[target.id] = value.value
    return TorchBuild(version=str(values.get("__version__", "unknown")),
                      cuda=_str_or_none(values.get("cuda")), hip=_str_or_none(values.get("hip")))


def _str_or_none(value: object) -> str | None:
    return None if value in (None, "") else str(value)


def installed_torch_build() -> TorchBuild | None:
    """The build of the torch that `import torch` would load, or None if there is none."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "version.py")
        if os.path.isfile(path):
            return read_torch_build(path)
    return TorchBuild(version="unknown", cuda=None, hip=None)


def hidden_by_env(variables: tuple[str, ...]) -> str | None:
    """The first of `variables` that is set to hide every device ('' or starting '-1')."""
    for name in variables:
        value = os.environ.get(name)
        if value is not None and (not value.strip() or value.strip().startswith("-1")):
            return f"{name}={value!r} hides every GPU"
    return None


def nvidia_gpu_count() -> tuple[int, str]:
    """(number of NVIDIA GPUs the driver reports, reason when 0), through NVML."""
    lib = None
    for name in NVML_LIBRARIES:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return 0, "no NVIDIA driver found (the NVML library libnvidia-ml cannot be loaded)"
    rc = lib.nvmlInit_v2()
    if rc != 0:
        return 0, f"the NVIDIA driver is present but did not initialise (NVML error {rc})"
    try:
        count = ctypes.c_uint(0)
        rc = lib.nvmlDeviceGetCount_v2(ctypes.byref(count))
        if rc != 0:
            return 0, f"NVML could not count the GPUs (error {rc})"
        return count.value, "" if count.value else "the NVIDIA driver reports no GPU"
    finally:
        lib.nvmlShutdown()


def cuda_is_available() -> tuple[bool, str]:
    """(available, reason) for the `cuda` platform. Never raises."""
    try:
        build = installed_torch_build()
        if build is None:
            return False, f"torch is not installed: {CUDA_TORCH_HINT}"
        if build.hip:
            return False, (f"the installed torch {build.version} is a ROCm build: use "
                           "--device rocm (`pip install kvport-rocm`)")
        if not build.cuda:
            return False, f"the installed torch {build.version} has no CUDA support: {CUDA_TORCH_HINT}"
        if importlib.util.find_spec("triton") is None:
            return False, ("triton is not installed (PyTorch's CUDA wheels bring it on Linux): "
                           "`pip install triton`")
        hidden = hidden_by_env(("CUDA_VISIBLE_DEVICES",))
        if hidden:
            return False, hidden
        count, reason = nvidia_gpu_count()
        if count == 0:
            return False, reason
        return True, f"{count} NVIDIA GPU(s); torch {build.version} (CUDA {build.cuda})"
    except Exception as exc:     # the contract: report, never raise
        return False, f"CUDA detection failed: {type(exc).__name__}: {exc}"
