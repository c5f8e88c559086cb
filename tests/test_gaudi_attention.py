"""hpu_flat's formulation on the CPU: its plan, bucketing that never changes a result, a
softmax merge that survives extreme scores, and padded tokens. (tests/test_gaudi_kit.py runs
the conformance kit's grid and end-to-end check on it; nothing here ran on a Gaudi.)"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("kvport_gaudi") is None:
    pytest.skip("kvport-gaudi is not installed (scripts/install.sh --test installs it)",
                allow_module_level=True)

import torch  # noqa: E402
from kvport_gaudi.attention import GaudiPagedBackend  # noqa: E402
from kvport_gaudi.buckets import BucketRule, GaudiBuckets  # noqa: E402
from kvport_gaudi.plan import plan_decode  # noqa: E402

from kvport.attention_backends.torch_reference import (  # noqa: E402
    TorchReferenceBackend, gather_context)

from paged_cases import MAX_REL_ERR, compare_with_reference, random_step  # noqa: E402

MIXED = [(0, 1), (15, 1), (16, 1), (70, 1), (200, 1), (0, 9), (13, 40), (33, 16), (5, 2)]
COARSE = GaudiBuckets(*(BucketRule(minimum=8, step=64) for _ in range(6)))
FINE = GaudiBuckets(*(BucketRule(minimum=1, step=4) for _ in range(6)))


def run(step, buckets, cache=None):
    backend = GaudiPagedBackend(step.spec, buckets)
    cache = step.cache.clone() if cache is None else cache
    out = backend.forward(step.query, step.key, step.value, cache,
                          backend.build_metadata(step.common, "cpu"))
    return out, cache, backend


@pytest.mark.parametrize("group, window", [(1, None), (4, None), (2, 24)],
                         ids=["mha", "gqa4", "gqa2-window24"])
def test_bucketing_never_changes_the_result(group, window):
    step = random_step(MIXED, num_heads=2 * group, num_kv_heads=2, head_size=32,
                       block_size=16, sliding_window=window, seed=5 + group)
    exact, _, _ = run(step, GaudiBuckets.exact())
    for buckets in (GaudiBuckets(), COARSE, FINE):
        out, _, backend = run(step, buckets)
        shape = backend.build_metadata(step.common, "cpu").shape_key()
        torch.testing.assert_close(out, exact, rtol=1e-6, atol=1e-6,
                                   msg=f"buckets {buckets} (padded shape {shape})")
    err, _ = compare_with_reference(GaudiPagedBackend(step.spec, COARSE), step)
    assert err < MAX_REL_ERR["float32"], err


def test_padded_shapes_come_from_the_buckets():
    step = random_step(MIXED, num_heads=4, num_kv_heads=2, head_size=32, block_size=16, seed=1)
    metadata = GaudiPagedBackend(step.spec, COARSE).build_metadata(step.common, "cpu")
    decode_entries = sum(-(-(c + 1) // 16) for c, q in MIXED if q == 1)
    assert decode_entries == 22
    # decode: 5 requests -> 8, 22 entries -> 32; prefill: 4 -> 8 requests, 40 rows -> 64,
    # at most 4 blocks -> 8; tokens are not padded unless the worker asks
    assert metadata.shape_key() == (int(step.common.num_tokens), 32, 8, 8, 64, 8)


def test_flat_plan_maps_every_block_to_its_request():
    bs = 4
    seq_lens = np.array([9, 1, 4], dtype=np.int32)      # 3, 1 and 1 blocks
    table = np.array([[7, 3, 5], [2, 0, 0], [6, 0, 0]], dtype=np.int32)
    qsl = np.arange(4)
    plan = plan_decode(np.arange(3), qsl, seq_lens, table, bs, None,
                       GaudiBuckets(decode_seqs=BucketRule(4, 4), decode_blocks=BucketRule(8, 8)),
                       dummy_row=3)
    assert plan.block_list.tolist() == [7, 3, 5, 2, 6, 7, 7, 7]   # padding re-reads block 7
    assert plan.block_mapping.argmax(1)[:5].tolist() == [0, 0, 0, 1, 2]
    assert plan.block_mapping[5:].sum() == 0 and plan.block_mapping[:, 3].sum() == 0
    assert (plan.block_mapping.T @ plan.block_weight)[:3].tolist() == [1, 1, 1]
    assert np.isneginf(plan.block_bias[2, 1:]).all() and plan.block_bias[2, 0] == 0
    assert plan.out_rows.tolist() == [0, 1, 2, 3]                  # padding -> dummy row


def test_the_block_merge_survives_extreme_scores():
    """Block maxima 90-200 apart within a request and requests ~200 apart: exp() of unshifted
    scores overflows, and one shift for all requests underflows the small ones to 0/0. The
    merge is exact while a request's block maxima stay within 320 of each other."""
    step = random_step([(300, 1), (40, 1), (1000, 1), (3, 1)], num_heads=4, num_kv_heads=1,
                       head_size=16, block_size=16, seed=3)
    step.query[0] *= 20.0
    step.query[2] *= -12.0
    step.cache[0] *= torch.linspace(0.1, 4.0, step.cache.shape[1])[:, None, None, None]
    step.cache[:, 0] = 0.0         # paged_cases' NaN block 0 is owned by nobody here
    table = torch.from_numpy(step.common.block_table).long()
    keys, _ = gather_context(step.cache, table[0, :19], 300)
    scores = step.query[0] @ keys[:288, 0].T * step.spec.scale          # 18 whole blocks
    block_max = scores.view(4, 18, 16).amax(-1)
    assert (block_max.amax(-1) - block_max.amin(-1)).min() > 90        # exp(90) overflows
    err, out = compare_with_reference(GaudiPagedBackend(step.spec), step)
    assert torch.isfinite(out).all()
    assert err < MAX_REL_ERR["float32"], err


def test_a_request_beyond_the_exact_range_does_not_spoil_the_others():
    """Block maxima thousands apart in request 0 (past the 320 the merge is exact for):
    every number stays finite and the other requests are still exact."""
    step = random_step([(300, 1), (40, 1), (100, 1)], num_heads=2, num_kv_heads=1,
                       head_size=16, block_size=16, seed=9)
    step.query[0] *= 200.0
    step.cache[0] *= torch.linspace(0.1, 4.0, step.cache.shape[1])[:, None, None, None]
    step.cache[:, 0] = 0.0
    out, _, _ = run(step, GaudiBuckets())
    reference = TorchReferenceBackend(step.spec)
    expected = reference.forward(step.query, step.key, step.value, step.cache.clone(),
                                 reference.build_metadata(step.common, "cpu"))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1:], expected[1:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_caches(dtype):
    step = random_step(MIXED, num_heads=8, num_kv_heads=2, head_size=64, block_size=16,
                       dtype=dtype, seed=11)
    err, _ = compare_with_reference(GaudiPagedBackend(step.spec), step)
    assert err < MAX_REL_ERR[dtype], err


def test_token_padding_writes_padding_into_its_own_slot_and_returns_zeros():
    step = random_step(MIXED, num_heads=4, num_kv_heads=2, head_size=32, block_size=16, seed=2)
    pad_block = step.cache.shape[1]            # one block more, as the Gaudi worker allocates
    step.cache = torch.cat([step.cache, torch.randn(2, 1, *step.cache.shape[2:])], dim=1)
    exact, exact_cache, _ = run(step, GaudiBuckets.exact())
    backend = GaudiPagedBackend(step.spec)
    backend.enable_token_padding(pad_slot=pad_block * 16)
    metadata = backend.build_metadata(step.common, "cpu")
    T, padded = step.common.num_tokens, metadata.num_padded_tokens
    assert padded == 128 and T == 72
    query = torch.cat([step.query, torch.randn(padded - T, *step.query.shape[1:])])
    key = torch.cat([step.key, torch.randn(padded - T, *step.key.shape[1:])])
    value = torch.cat([step.value, torch.randn(padded - T, *step.value.shape[1:])])
    cache = step.cache.clone()
    out = backend.forward(query, key, value, cache, metadata)
    torch.testing.assert_close(out[:T], exact, rtol=1e-6, atol=1e-6)
    assert not out[T:].any()
    changed = cache.nan_to_num(7.0) != exact_cache.nan_to_num(7.0)      # paged_cases: NaN block 0
    changed = changed.flatten(2).any(-1).any(0).nonzero().flatten().tolist()
    assert changed == [pad_block]
    with pytest.raises(ValueError, match="the model ran 72 tokens but the step's metadata has 128"):
        backend.forward(step.query, step.key, step.value, cache, metadata)
