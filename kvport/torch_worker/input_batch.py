"""Build one step's model inputs from the worker's request states (numpy first, then torch)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvport.attention_backends.interface import CommonAttentionMetadata
from kvport.torch_worker.request_state import RequestState


@dataclass
class StepInputs:
    """Flat token inputs of a step, the attention metadata, and which rows sample."""
    input_ids: np.ndarray          # [num_tokens] int64
    positions: np.ndarray          # [num_tokens] int64
    attention: CommonAttentionMetadata
    sampling_req_ids: list[str]    # requests that reach their last token this step
    logits_indices: np.ndarray     # [num_sampling] index of each one's last token


def build_step_inputs(states: list[RequestState], num_scheduled: list[int],
                      block_size: int) -> StepInputs:
    """Concatenate each request's scheduled tokens; a request samples when it reaches its end."""
    num_reqs = len(states)
    query_start_loc = np.zeros(num_reqs + 1, dtype=np.int32)
    query_start_loc[1:] = np.cumsum(num_scheduled)
    max_blocks = max(len(s.block_ids) for s in states)
    block_table = np.zeros((num_reqs, max_blocks), dtype=np.int32)
    seq_lens = np.empty(num_reqs, dtype=np.int32)
    input_ids, positions, slots = [], [], []
    sampling_req_ids, logits_indices = [], []
    for i, (state, count) in enumerate(zip(states, num_scheduled)):
        start = state.num_computed_tokens
        end = start + count
        blocks = np.asarray(state.block_ids, dtype=np.int64)
        block_table[i, :len(blocks)] = blocks
        seq_lens[i] = end
        pos = np.arange(start, end, dtype=np.int64)
        positions.append(pos)
        slots.append(blocks[pos // block_size] * block_size + pos % block_size)
        input_ids.append(np.asarray(state.token_at(start, end), dtype=np.int64))
        if end >= state.num_tokens:
            sampling_req_ids.append(state.req_id)
            logits_indices.append(query_start_loc[i + 1] - 1)
    attention = CommonAttentionMetadata(query_start_loc=query_start_loc, seq_lens=seq_lens,
                                        block_table=block_table,
                                        slot_mapping=np.concatenate(slots))
    return StepInputs(np.concatenate(input_ids), np.concatenate(positions), attention,
                      sampling_req_ids, np.asarray(logits_indices, dtype=np.int64))
