"""Read a checkpoint as (Hugging Face parameter name, torch tensor) pairs, one at a time.

The reading itself (which safetensors files, GGUF dequantization, renaming and un-permuting)
lives in the framework-free `kvport.core.checkpoint`, shared with the JAX worker so every
worker loads identical numbers. Only safetensors go through `safe_open(framework="pt")`
here: it reads bfloat16 straight into torch, which numpy cannot hold.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from kvport.core.checkpoint import CheckpointError, iter_gguf, safetensors_files
from kvport.core.model_info import ModelInfo

# The torch side's name for the same error: a checkpoint that cannot be loaded into a model.
WeightLoadError = CheckpointError


def iter_weights(model_info: ModelInfo) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, CPU tensor) for every tensor of the model's checkpoint."""
    if model_info.format == "gguf":
        for name, array in iter_gguf(model_info.path, model_info.hf_config):
            # a plain float32 GGUF tensor comes as a read-only memory map: copy only then
            yield name, torch.from_numpy(np.require(array, requirements="W"))
    else:
        yield from _iter_safetensors(model_info.path)


def _iter_safetensors(directory: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in safetensors_files(directory):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
