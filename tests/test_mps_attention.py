"""mps_sdpa's formulation on the CPU: one SDPA call for the decodes and one for the prefill
chunks whatever the batch, padding that never reads outside the step's blocks, every cache
dtype MPS offers. (tests/test_mps_kit.py runs the conformance kit on it; nothing here ran on
an Apple GPU.)"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("kvport_mps") is None:
    pytest.skip("kvport-mps is not installed (scripts/install.sh --test installs it)",
                allow_module_level=True)

import torch.nn.functional as F  # noqa: E402
from kvport_mps.attention import MpsSdpaBackend, plan_batch  # noqa: E402

from paged_cases import MAX_REL_ERR, compare_with_reference, random_step  # noqa: E402

MIXED = [(0, 1), (15, 1), (16, 1), (70, 1), (200, 1), (0, 9), (13, 40), (33, 16), (5, 2)]


@pytest.mark.parametrize("group, window, dtype", [
    (1, None, "float32"), (4, None, "float32"), (2, 24, "float32"), (4, None, "float16"),
    (2, None, "bfloat16")])
def test_matches_the_reference_without_reading_foreign_blocks(group, window, dtype):
    """paged_cases poisons block 0 (no request owns it) with NaN: a padding read shows."""
    step = random_step(MIXED, num_heads=2 * group, num_kv_heads=2, head_size=32,
                       block_size=16, sliding_window=window, dtype=dtype, seed=group)
    err, _ = compare_with_reference(MpsSdpaBackend(step.spec), step)
    assert err < MAX_REL_ERR[dtype], err


@pytest.mark.parametrize("requests", [MIXED, [(c, 1) for c in range(0, 400, 7)],
                                      [(c, 3 + c % 5) for c in range(0, 90, 9)]],
                         ids=["mixed", "57-decodes", "10-prefills"])
def test_one_sdpa_call_per_kind_of_request(requests, monkeypatch):
    step = random_step(requests, num_heads=4, num_kv_heads=2, head_size=16, block_size=8,
                       seed=3)
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    err, _ = compare_with_reference(MpsSdpaBackend(step.spec), step)
    kinds = {q == 1 for _, q in requests}
    assert len(calls) == len(kinds) and err < MAX_REL_ERR["float32"]


def test_plan_pads_rows_and_blocks():
    # request 0: 2 tokens at positions 5, 6 (blocks 4 and 9); request 1: 3 tokens at 0..2
    table = np.array([[4, 9, 0], [7, 0, 0]], dtype=np.int32)
    qsl = np.array([0, 2, 5])
    seq_lens = np.array([7, 3], dtype=np.int32)
    plan = plan_batch(np.array([0, 1]), qsl, seq_lens, table, 4, None, 2, dummy_row=5)
    assert (plan["num_reqs"], plan["query_len"], plan["num_blocks"]) == (2, 3, 2)
    assert plan["block_ids"].tolist() == [4, 9, 7, 7]           # request 1 repeats block 7
    assert plan["q_rows"].tolist() == [0, 1, 0, 2, 3, 4]
    assert plan["out_rows"].tolist() == [0, 1, 5, 2, 3, 4]      # padding -> dummy row 5
    mask = plan["mask"]                                          # [2, 1, 2 * 3, 8]
    assert mask.shape == (2, 1, 6, 8)
    assert mask[0, 0, 0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]   # position 5 sees 0..5
    assert mask[0, 0, 2].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]   # padding row: one slot
    assert (mask[0, 0, 3:] == mask[0, 0, :3]).all()              # second query head, same
    assert mask[1, 0, 2].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
