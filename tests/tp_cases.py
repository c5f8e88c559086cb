"""Tiny sharded models run as tensor-parallel ranks in threads (kvport.testing.thread_group),
shared by tests/test_tensor_parallel_layers.py and tests/test_tp_invariant.py: a prefill of
every prompt, then one decode step each, through the torch reference attention on the CPU."""
from __future__ import annotations

import numpy as np
import torch

from kvport.attention_backends.interface import AttentionSpec, CommonAttentionMetadata
from kvport.attention_backends.torch_reference import TorchReferenceBackend
from kvport.core.tensor_parallel import HeadShard
from kvport.models.loader import build_model
from kvport.testing.thread_group import run_ranks

BLOCK_SIZE = 4


def tp_backend(info, heads: HeadShard, dtype: str = "float32") -> TorchReferenceBackend:
    return TorchReferenceBackend(AttentionSpec(heads.num_heads, heads.num_kv_heads,
                                               info.head_size, BLOCK_SIZE, dtype,
                                               info.head_size ** -0.5))


def prefill_then_decode(prompts: list[list[int]]):
    """A prefill step of every prompt, then one decode step each: [(ids, positions, meta)]."""
    blocks = [list(range(1 + 8 * i, 9 + 8 * i)) for i in range(len(prompts))]

    def metadata(starts, lens):
        qsl = np.concatenate([[0], np.cumsum([e - s for s, e in zip(starts, lens)])])
        table = np.array(blocks, dtype=np.int32)
        slots = [b[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
                 for b, s, e in zip(blocks, starts, lens) for p in range(s, e)]
        return CommonAttentionMetadata(query_start_loc=qsl.astype(np.int32),
                                       seq_lens=np.array(lens, dtype=np.int32),
                                       block_table=table, slot_mapping=np.array(slots))
    lens = [len(p) for p in prompts]
    prefill = (sum(prompts, []), [i for n in lens for i in range(n)],
               metadata([0] * len(prompts), lens))
    nexts = [(7 * i + 5) % 300 for i in range(len(prompts))]
    decode = (nexts, lens, metadata(lens, [n + 1 for n in lens]))
    return [prefill, decode]


def run_steps(model, info, num_kv_heads: int, prompts) -> list[torch.Tensor | None]:
    """Logits of the last token of every request, per step."""
    backend = model.model.layers[0].self_attn.attn_backend
    shape = backend.kv_cache_shape(8 * len(prompts) + 1, BLOCK_SIZE, num_kv_heads,
                                   info.head_size)
    dtype = model.model.norm.weight.dtype
    caches = [torch.zeros(shape, dtype=dtype) for _ in range(info.num_layers)]
    results = []
    with torch.inference_mode():
        for ids, positions, common in prefill_then_decode(prompts):
            hidden = model(torch.tensor(ids), torch.tensor(positions), caches,
                           backend.build_metadata(common, torch.device("cpu")))
            last = torch.from_numpy(common.query_start_loc[1:].astype(np.int64) - 1)
            results.append(model.compute_logits(hidden[last]))
    return results


def checkpoint_weights(info) -> list[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors, biases made non-zero (transformers initializes them to 0)."""
    from kvport.models.weights import iter_weights
    generator = torch.Generator().manual_seed(1)
    return [(n, t + 0.2 * torch.randn(t.shape, generator=generator) if n.endswith(".bias")
             else t) for n, t in iter_weights(info)]


def sharded_logits(info, model_class, size: int, prompts, dtype=torch.float32,
                   reduce_in_float32: bool = False, invariant_matmul=None):
    """Rank 0's logits per step of the model cut over `size` ranks; `invariant_matmul`:
    under make_tp_invariant with that matmul (kvport/models/invariant.py)."""
    def rank_main(rank: int, group):
        group.reduce_in_float32 = reduce_in_float32
        heads = HeadShard.of(info.num_heads, info.num_kv_heads, size, rank)
        model = build_model(info, model_class, dtype,
                            tp_backend(info, heads, str(dtype).removeprefix("torch.")),
                            "cpu", weights=checkpoint_weights(info), model_kwargs={"tp": group})
        if invariant_matmul is not None:
            from kvport.models.invariant import make_tp_invariant
            make_tp_invariant(model, invariant_matmul, group)
        return run_steps(model, info, heads.num_kv_heads, prompts)

    outputs = run_ranks(size, rank_main, timeout_s=60)
    assert all(step is None for out in outputs[1:] for step in out), "only rank 0 gets logits"
    return outputs[0]
