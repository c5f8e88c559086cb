"""Replacing a model's modules of one type by a platform's faster equivalents."""
from __future__ import annotations

from typing import Callable

from torch import nn


def replace_modules(model: nn.Module, module_type: type,
                    make: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every submodule whose type is exactly `module_type` (subclasses, such as an
    already fused one, are left alone) by `make(module)`; returns how many."""
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is module_type]
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, make(module))
    return len(targets)
