"""Where the Triton kernel tests run: compiled on the GPU when there is one, else in Triton's
CPU interpreter (CI). Call `triton_device()` before importing any module that defines
kernels: the interpreter must be switched on before @triton.jit runs."""
from __future__ import annotations

import importlib.util
import os

import pytest


def triton_device(*needs: str):
    """The torch device for this test module, or skip it: without triton (and the given
    modules), or on a CPU where TRITON_INTERPRET is set to something other than 1."""
    for name in ("triton", *needs):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"needs {name} (scripts/install.sh --test installs it)",
                        allow_module_level=True)
    import torch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if os.environ["TRITON_INTERPRET"] != "1":
            pytest.skip("no GPU, and TRITON_INTERPRET is set to something other than 1",
                        allow_module_level=True)
    return device
