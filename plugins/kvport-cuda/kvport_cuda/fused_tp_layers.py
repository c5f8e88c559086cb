"""Swapping a tensor-parallel Llama-family model onto the fused all-reduce + residual + norm.

The layers' own order stays: a row-parallel matmul (o_proj, down_proj) is always followed by
the norm that adds its output to the residual stream (the same layer's post-attention norm,
the next layer's input norm, or the final norm). Here the matmul leaves its partial product in
the symmetric buffer instead of summing it, and that norm sums, adds and normalises in one
kernel (kvport_cuda/all_reduce_norm.py). A partial that the fused kernel would not take (too
many rows: prefill chunks) is summed by the matmul as before, and the norm sees a plain tensor.
The swap is made only on the exact classes whose forward guarantees that order.
"""
from __future__ import annotations

import torch
from torch import nn

from kvport.models.layers import GatedMLP, RMSNorm
from kvport.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaModel
from kvport.models.parallel_layers import RowParallelLinear
from kvport_cuda.all_reduce_norm import AllReduceNorm
from kvport_cuda.fused_norm import FusedRMSNorm


class PartialSumLinear(RowParallelLinear):
    """A row-parallel matmul whose partial product the next AllReduceRMSNorm sums."""

    fused: AllReduceNorm
    region: int

    @classmethod
    def from_module(cls, module: RowParallelLinear, fused: AllReduceNorm,
                    region: int) -> "PartialSumLinear":
        with torch.device("meta"):                   # the weight is the module's own
            new = cls(module.full_in_features, module.start, module.in_features,
                      module.out_features, bias=False, tp=module.tp)
        new.weight = module.weight
        new.fused, new.region = fused, region
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        staged = self.fused.stage_product(x, self.weight, self.region)
        if staged is None:
            return super().forward(x)                 # summed here, as before
        return staged.view(*x.shape[:-1], staged.shape[-1])


class AllReduceRMSNorm(FusedRMSNorm):
    """The norm after a PartialSumLinear: sums a staged partial, adds the residual and
    normalises in one kernel."""

    fused: AllReduceNorm
    region: int

    @classmethod
    def from_norm(cls, module: RMSNorm, fused: AllReduceNorm, region: int) -> "AllReduceRMSNorm":
        new = cls.from_module(module)
        new.fused, new.region = fused, region
        return new

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.fused.holds(x, self.region):
            if (residual is not None and residual.is_contiguous()
                    and residual.shape == x.shape and x.dim() == 2):
                return self.fused.all_reduce_add_rms_norm(x, residual, self.weight, self.eps,
                                                          self.region)
            x = self.fused.sum_partial(x)             # summed first, then the plain norm
        return super().forward(x, residual)


def can_fuse_all_reduce_norms(model: nn.Module) -> bool:
    """Whether `model` is a Llama-family model in the exact layout the swap relies on (ask
    before building the AllReduceNorm: its shared memory is wasted on any other model)."""
    inner = getattr(model, "model", None)
    if type(inner) is not LlamaModel or len(inner.layers) == 0:
        return False
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not (type(layer) is LlamaDecoderLayer and type(attn) is LlamaAttention
                and type(mlp) is GatedMLP and type(attn.o_proj) is RowParallelLinear
                and type(mlp.down_proj) is RowParallelLinear
                and attn.o_proj.bias is None and mlp.down_proj.bias is None):
            return False
    return True


def fuse_all_reduce_norms(model: nn.Module, fused: AllReduceNorm) -> int:
    """Swap every row-parallel matmul and the norm after it; returns how many pairs (0 when
    the model is not one whose order this relies on)."""
    if not can_fuse_all_reduce_norms(model):
        return 0
    inner = model.model
    layers = list(inner.layers)
    # o_proj -> region 0, down_proj -> region 1: consecutive pairs alternate, within a step
    # and from one step's last to the next step's first (all_reduce_norm.py says why)
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        attn.o_proj = PartialSumLinear.from_module(attn.o_proj, fused, region=0)
        layer.post_attention_layernorm = AllReduceRMSNorm.from_norm(
            layer.post_attention_layernorm, fused, region=0)
        mlp.down_proj = PartialSumLinear.from_module(mlp.down_proj, fused, region=1)
        following = layers[i + 1].input_layernorm if i + 1 < len(layers) else inner.norm
        replacement = AllReduceRMSNorm.from_norm(following, fused, region=1)
        if i + 1 < len(layers):
            layers[i + 1].input_layernorm = replacement
        else:
            inner.norm = replacement
    return 2 * len(layers)
