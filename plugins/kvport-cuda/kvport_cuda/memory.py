"""KV cache sizing: what is left of `gpu_memory_utilization` x the GPU's memory once the
weights, the activations of the largest step and everything outside PyTorch's allocator
(the CUDA context, cuBLAS and Triton modules) are accounted for.

The activation peak is measured, not estimated: a dummy step of `max_num_batched_tokens`
tokens spread over as many requests as may run at once goes through the model, the LM head
and a sort of the logits (the most memory any sampling path takes), with PyTorch's peak
counter reset just before.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from kvport.attention_backends.interface import CommonAttentionMetadata

logger = logging.getLogger(__name__)

GiB = 2**30
# Kept free for the CUDA-graph memory pool, which is captured after the KV cache exists.
GRAPH_POOL_RESERVE = GiB // 2


@dataclass
class MemoryProfile:
    total: int                 # the GPU's memory
    utilization: float         # the fraction kvport may take
    weights: int               # PyTorch allocations before the dummy step (the model)
    peak_activation: int       # extra bytes the dummy step took at its peak
    non_torch: int             # used on the GPU outside PyTorch's allocator
    graph_reserve: int
    kv_cache: int              # what remains for the KV cache

    def describe(self) -> str:
        g = lambda b: f"{b / GiB:.2f} GiB"   # noqa: E731
        return (f"GPU memory {g(self.total)} x {self.utilization} = "
                f"{g(self.total * self.utilization)}: weights {g(self.weights)}, peak "
                f"activations {g(self.peak_activation)}, outside PyTorch {g(self.non_torch)}, "
                f"graph reserve {g(self.graph_reserve)} -> KV cache {g(self.kv_cache)}")


def dummy_step(num_tokens: int, num_reqs: int, block_size: int, vocab_size: int
               ) -> tuple[np.ndarray, np.ndarray, CommonAttentionMetadata, int]:
    """A step of `num_tokens` prompt tokens over `num_reqs` requests, on blocks 0, 1, ...
    Returns (input ids below `vocab_size`, positions, attention metadata, blocks used)."""
    num_reqs = max(1, min(num_reqs, num_tokens))
    lens = np.full(num_reqs, num_tokens // num_reqs, dtype=np.int64)
    lens[: num_tokens % num_reqs] += 1
    blocks = -(-lens // block_size)
    first_block = np.concatenate([[0], np.cumsum(blocks)[:-1]])
    table = np.zeros((num_reqs, int(blocks.max())), dtype=np.int32)
    positions, slots = [], []
    for i, (n, b0) in enumerate(zip(lens.tolist(), first_block.tolist())):
        table[i, :blocks[i]] = np.arange(b0, b0 + blocks[i])
        pos = np.arange(n)
        positions.append(pos)
        slots.append((b0 + pos // block_size) * block_size + pos % block_size)
    qsl = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    common = CommonAttentionMetadata(query_start_loc=qsl, seq_lens=lens.astype(np.int32),
                                     block_table=table, slot_mapping=np.concatenate(slots))
    ids = (np.arange(num_tokens) * 7919 % vocab_size).astype(np.int64)   # any valid ids
    return ids, np.concatenate(positions), common, int(blocks.sum())


@torch.inference_mode()
def profile_memory(model, attn_backend, kv_cache_shape, dtype: torch.dtype, num_layers: int,
                   vocab_size: int, device: torch.device, max_num_batched_tokens: int,
                   max_num_seqs: int, block_size: int, utilization: float) -> MemoryProfile:
    """Run the largest step once and split the GPU's memory as the module docstring says.

    kv_cache_shape(num_blocks) gives one layer's cache shape; the dummy step writes into one
    small cache shared by all layers (its contents do not matter)."""
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    ids, positions, common, num_blocks = dummy_step(max_num_batched_tokens, max_num_seqs,
                                                    block_size, vocab_size)
    cache = torch.empty(kv_cache_shape(num_blocks + 1), dtype=dtype, device=device)
    weights = torch.cuda.memory_allocated(device) - cache.numel() * cache.element_size()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    metadata = attn_backend.build_metadata(common, device)
    hidden = model(torch.from_numpy(ids).to(device), torch.from_numpy(positions).to(device),
                   [cache] * num_layers, metadata)
    last = torch.from_numpy(common.query_start_loc[1:].astype(np.int64) - 1).to(device)
    logits = model.compute_logits(hidden[last])     # None on tensor-parallel ranks but 0
    if logits is not None:
        logits.sort(dim=-1)                # top-p sampling's sort: the largest sampler buffer
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del hidden, logits, cache, metadata
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    non_torch = max((total - free) - torch.cuda.memory_reserved(device), 0)
    kv = int(total * utilization) - weights - peak - non_torch - GRAPH_POOL_RESERVE
    return MemoryProfile(total=total, utilization=utilization, weights=weights,
                         peak_activation=peak, non_torch=non_torch,
                         graph_reserve=GRAPH_POOL_RESERVE, kv_cache=max(kv, 0))
