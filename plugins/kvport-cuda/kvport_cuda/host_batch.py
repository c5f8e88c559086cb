"""One step's integer inputs, built on the host in as few Python operations as possible.

The shared runner's `build_step_inputs` makes numpy arrays per request; a pure-decode step
needs only four numbers per request (token, position, slot, context length), so it gets its
own loop that appends to Python lists and converts once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvport.torch_worker.request_state import RequestState


@dataclass
class HostBatch:
    """int32 arrays of one step. Decode steps have exactly one token per request."""
    input_ids: np.ndarray          # [num_tokens]
    positions: np.ndarray          # [num_tokens]
    slot_mapping: np.ndarray       # [num_tokens]
    seq_lens: np.ndarray           # [num_reqs] context length after this step
    query_lens: np.ndarray         # [num_reqs]
    sampling_rows: list[int]       # requests that reach their last token (and sample)
    logits_indices: np.ndarray     # [num_sampling] int64: each one's last token
    decode_only: bool

    @property
    def num_reqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def build_decode_batch(states: list[RequestState], block_size: int) -> HostBatch:
    """One query token per request: its next token at position num_computed_tokens."""
    ids, positions, slots, sampling = [], [], [], []
    for i, s in enumerate(states):
        p = s.num_computed_tokens
        prompt = s.prompt_token_ids
        n_prompt = len(prompt)
        ids.append(prompt[p] if p < n_prompt else s.output_token_ids[p - n_prompt])
        positions.append(p)
        slots.append(s.block_ids[p // block_size] * block_size + p % block_size)
        if p + 1 >= n_prompt + len(s.output_token_ids):
            sampling.append(i)
    pos = np.asarray(positions, dtype=np.int32)
    n = len(states)
    return HostBatch(input_ids=np.asarray(ids, dtype=np.int32), positions=pos,
                     slot_mapping=np.asarray(slots, dtype=np.int32), seq_lens=pos + 1,
                     query_lens=np.ones(n, dtype=np.int32), sampling_rows=sampling,
                     logits_indices=np.asarray(sampling, dtype=np.int64), decode_only=True)


def build_mixed_batch(states: list[RequestState], counts: list[int],
                      block_size: int) -> HostBatch:
    """Any step: each request's scheduled tokens, concatenated in batch order."""
    ids: list[int] = []
    positions, slots = [], []
    seq_lens = np.empty(len(states), dtype=np.int32)
    sampling, logits_indices = [], []
    offset = 0
    for i, (s, count) in enumerate(zip(states, counts)):
        start = s.num_computed_tokens
        end = start + count
        ids.extend(s.token_at(start, end))
        pos = np.arange(start, end, dtype=np.int64)
        blocks = np.asarray(s.block_ids, dtype=np.int64)
        positions.append(pos)
        slots.append(blocks[pos // block_size] * block_size + pos % block_size)
        seq_lens[i] = end
        offset += count
        if end >= s.num_tokens:
            sampling.append(i)
            logits_indices.append(offset - 1)
    return HostBatch(input_ids=np.asarray(ids, dtype=np.int32),
                     positions=np.concatenate(positions).astype(np.int32),
                     slot_mapping=np.concatenate(slots).astype(np.int32), seq_lens=seq_lens,
                     query_lens=np.asarray(counts, dtype=np.int32), sampling_rows=sampling,
                     logits_indices=np.asarray(logits_indices, dtype=np.int64),
                     decode_only=len(ids) == len(states))


def build_host_batch(states: list[RequestState], counts: list[int],
                     block_size: int) -> HostBatch:
    if len(counts) and sum(counts) == len(counts):
        return build_decode_batch(states, block_size)
    return build_mixed_batch(states, counts, block_size)
