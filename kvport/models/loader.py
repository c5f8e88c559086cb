"""Build a model on its device with its checkpoint's weights, without a random init.

The model is constructed on the meta device (no memory, no init kernels), materialized
uninitialized on the target device with `to_empty`, then every parameter is filled by
`load_weights`, which refuses a checkpoint that leaves any parameter unset. Buffers that are
computed rather than loaded (the rotary cos/sin cache) are recomputed by each module's
`reset_cache()`.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from kvport.attention_backends.interface import AttentionBackend
from kvport.core.model_info import ModelInfo
from kvport.models.weights import iter_weights


def build_model(model_info: ModelInfo, model_class: Callable[..., nn.Module],
                torch_dtype: torch.dtype | str, attn_backend: AttentionBackend,
                device: torch.device | str,
                weights: Iterable[tuple[str, torch.Tensor]] | None = None,
                model_kwargs: dict | None = None) -> nn.Module:
    """`model_class(hf_config, attn_backend, **model_kwargs)` in `torch_dtype` on `device`,
    weights loaded, in eval mode with gradients off.

    `weights` (HF name, tensor) pairs replace reading the checkpoint with `iter_weights`.
    `model_kwargs` carries what only some models take (`tp`, the tensor-parallel group).
    """
    dtype = getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"torch_dtype must be a torch dtype or its name, got {torch_dtype!r}")
    with torch.device("meta"):
        model = model_class(model_info.hf_config, attn_backend, **(model_kwargs or {}))
    # Parameters take the model dtype on the meta device (nothing is allocated yet); buffers
    # keep the dtype their module chose (the rotary table stays float32). Not through
    # torch.set_default_dtype: that is process-wide, and ranks built as threads race on it.
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(dtype)
    model.to_empty(device=torch.device(device))
    for module in model.modules():
        reset = getattr(module, "reset_cache", None)
        if callable(reset):
            reset()
    source = iter_weights(model_info) if weights is None else weights
    model.load_weights((name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
                       for name, tensor in _with_progress(source, model_info.name))
    model.eval()
    model.requires_grad_(False)
    return model


def _with_progress(weights: Iterable[tuple[str, torch.Tensor]], name: str):
    """A progress bar over the checkpoint's tensors, shown only on a terminal."""
    import sys

    from tqdm.auto import tqdm
    return tqdm(weights, desc=f"Loading {name}", unit=" tensors", leave=False,
                disable=not sys.stderr.isatty())
