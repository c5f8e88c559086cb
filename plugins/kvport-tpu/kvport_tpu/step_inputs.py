"""Build one step's padded model inputs from the worker's request states (host numpy)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvport.attention_backends.interface import CommonAttentionMetadata
from kvport_tpu.attention.metadata import count_prefill_tiles
from kvport_tpu.buckets import ShapeBuckets, StepShape
from kvport_tpu.request_state import RequestState


@dataclass
class StepInputs:
    """Token inputs padded to `shape`, and which rows sample."""
    shape: StepShape
    input_ids: np.ndarray          # [T] int32 (0 for padding)
    positions: np.ndarray          # [T] int32 (0 for padding)
    attention: CommonAttentionMetadata   # unpadded; the backend pads it to `shape`
    logits_rows: np.ndarray        # [S] int32 token index whose logits each row takes
    sampling_states: list[RequestState]  # requests that reach their last token this step


def build_step_inputs(states: list[RequestState], num_scheduled: list[int], block_size: int,
                      buckets: ShapeBuckets) -> StepInputs:
    """Concatenate each request's scheduled tokens; a request samples when it reaches its end."""
    n = len(states)
    query_start_loc = np.zeros(n + 1, np.int32)
    query_start_loc[1:] = np.cumsum(num_scheduled)
    num_tokens = int(query_start_loc[-1])
    max_blocks = max(len(s.block_ids) for s in states)
    block_table = np.zeros((n, max_blocks), np.int32)
    seq_lens = np.empty(n, np.int32)
    shape = buckets.shape_for(num_tokens, n, max_blocks,
                              count_prefill_tiles(np.asarray(num_scheduled), buckets.prefill_tile))
    input_ids = np.zeros(shape.num_tokens, np.int32)
    positions = np.zeros(shape.num_tokens, np.int32)
    slots = np.empty(num_tokens, np.int64)
    logits_rows = np.zeros(shape.num_seqs, np.int32)
    sampling_states = []
    for i, (state, count) in enumerate(zip(states, num_scheduled)):
        start, end = state.num_computed_tokens, state.num_computed_tokens + count
        first, last = query_start_loc[i], query_start_loc[i + 1]
        blocks = np.asarray(state.block_ids, np.int64)
        block_table[i, :len(blocks)] = blocks
        seq_lens[i] = end
        pos = np.arange(start, end)
        positions[first:last] = pos
        slots[first:last] = blocks[pos // block_size] * block_size + pos % block_size
        input_ids[first:last] = state.token_at(start, end)
        if end >= state.num_tokens:
            logits_rows[len(sampling_states)] = last - 1
            sampling_states.append(state)
    attention = CommonAttentionMetadata(query_start_loc=query_start_loc, seq_lens=seq_lens,
                                        block_table=block_table, slot_mapping=slots)
    return StepInputs(shape, input_ids, positions, attention, logits_rows, sampling_states)
