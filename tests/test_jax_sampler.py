"""The JAX sampler (kvport-tpu) against the torch worker's sampler: same SamplingParams
semantics. Deterministic stages are compared value for value on random logits; the random
draw is checked statistically and for seeding.
"""
from __future__ import annotations

import math
import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kvport.core.sampling_params import SamplingParams
from kvport.torch_worker.request_state import RequestState
from kvport.torch_worker.sampler import (Sampler, SamplingMetadata, apply_min_p,
                                         apply_penalties, apply_top_k_top_p)
from kvport_tpu.sampler import (SamplingBatch, penalized_logits, sample_jit,
                                truncated_logits)

V = 64
ROWS = 16      # the padded row count the worker would use


def jax_batch(rows, rng_seed=0):
    """rows: (params, seed, prompt, output) -> (SamplingBatch, flags)."""
    return SamplingBatch.build(rows, ROWS, V, np.random.default_rng(rng_seed))


def torch_states(rows):
    return [RequestState(req_id=str(i), prompt_token_ids=list(prompt),
                         output_token_ids=list(output), sampling_params=params, block_ids=[],
                         num_computed_tokens=0,
                         generator=None if seed is None else torch.Generator().manual_seed(seed))
            for i, (params, seed, prompt, output) in enumerate(rows)]


def padded_logits(logits: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(np.pad(logits, ((0, ROWS - len(logits)), (0, 0))))


def random_tokens(rng, n):
    return [int(t) for t in rng.integers(0, V, n)]


@pytest.fixture
def rng():
    seed = secrets.randbits(32)
    print(f"seed {seed}")
    return np.random.default_rng(seed)


def test_greedy_penalties_and_min_tokens_match_torch(rng):
    rows = []
    for i in range(10):
        params = SamplingParams(
            temperature=0.0, repetition_penalty=float(rng.choice([1.0, 0.7, 1.3])),
            frequency_penalty=float(rng.uniform(-1, 1)),
            presence_penalty=float(rng.uniform(-1, 1)),
            min_tokens=int(rng.integers(0, 4)), stop_token_ids=random_tokens(rng, 2),
            ignore_eos=bool(i % 3 == 0), max_tokens=20)
        params.eos_token_ids = (int(rng.integers(0, V)),)
        rows.append((params, None, random_tokens(rng, int(rng.integers(1, 30))),
                     random_tokens(rng, int(rng.integers(0, 6)))))
    logits = rng.standard_normal((len(rows), V)).astype(np.float32) * 3
    batch, flags = jax_batch(rows)
    assert flags.all_greedy and flags.penalties and not flags.truncate
    ours = np.asarray(penalized_logits(padded_logits(logits), batch, flags))[:len(rows)]
    md = SamplingMetadata.from_states(torch_states(rows), V, "cpu")
    theirs = torch.from_numpy(logits.copy())
    if md.min_tokens_rows is not None:     # None: no row is under its min_tokens
        theirs[md.min_tokens_rows, md.min_tokens_cols] = float("-inf")
    theirs = apply_penalties(theirs, md).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    tokens, _ = sample_jit(padded_logits(logits), batch, flags)
    expected, _ = Sampler()(torch.from_numpy(logits), md)
    assert np.asarray(tokens)[:len(rows)].tolist() == expected.tolist()


@pytest.mark.parametrize("with_top_p", [True, False])
def test_truncation_matches_torch(rng, with_top_p):
    """temperature, top_k, top_p, min_p: the same tokens survive, with the same values. Without
    any top_p the logits are rounded so that top_k meets ties, which both sides keep."""
    rows = []
    for _ in range(12):
        rows.append((SamplingParams(
            temperature=float(rng.uniform(0.3, 2.0)), top_k=int(rng.choice([0, 1, 5, 20, V])),
            top_p=float(rng.choice([1.0, 0.5, 0.9])) if with_top_p else 1.0,
            min_p=float(rng.choice([0.0, 0.05, 0.2]))), None, [1], []))
    logits = rng.standard_normal((len(rows), V)).astype(np.float32) * 2
    if not with_top_p:
        logits = np.round(logits, 1)
    batch, flags = jax_batch(rows)
    assert flags.truncate and not flags.all_greedy
    x = penalized_logits(padded_logits(logits), batch, flags)
    ours = np.asarray(truncated_logits(x, batch, flags))[:len(rows)]
    md = SamplingMetadata.from_states(torch_states(rows), V, "cpu")
    theirs = torch.from_numpy(logits.copy()) / md.temperature.unsqueeze(1)
    theirs = apply_top_k_top_p(theirs, md.top_k, md.top_p)
    if md.min_p is not None:
        theirs = apply_min_p(theirs, md.min_p)
    theirs = theirs.numpy()
    assert np.array_equal(np.isinf(ours), np.isinf(theirs))
    finite = np.isfinite(theirs)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6)


def test_random_draws_follow_the_truncated_distribution(rng):
    """Many unseeded rows of one request: counts match softmax(truncated) (chi-square), and
    nothing outside top_k / the nucleus is ever drawn."""
    params = SamplingParams(temperature=0.8, top_k=12, top_p=0.9)
    logits_row = rng.standard_normal(V).astype(np.float32) * 2
    rows = [(params, None, [1], [])] * ROWS
    counts = np.zeros(V, np.int64)
    draws = 0
    for step in range(150):
        batch, flags = SamplingBatch.build(rows, ROWS, V, np.random.default_rng(step))
        tokens, _ = sample_jit(jnp.asarray(np.tile(logits_row, (ROWS, 1))), batch, flags)
        np.add.at(counts, np.asarray(tokens), 1)
        draws += ROWS
    one, one_flags = SamplingBatch.build(rows[:1], 1, V, np.random.default_rng(0))
    y = truncated_logits(penalized_logits(jnp.asarray(logits_row[None]), one, one_flags), one,
                         one_flags)
    probs = np.asarray(jax.nn.softmax(y, axis=-1), np.float64)[0]
    assert counts[probs == 0].sum() == 0
    keep = probs > 0
    expected = probs[keep] * draws
    chi2 = float((((counts[keep] - expected) ** 2) / expected).sum())
    df = int(keep.sum()) - 1
    assert chi2 < df + 6 * math.sqrt(2 * df) + 10, (chi2, df)


def test_seeded_rows_reproduce_in_any_batch_and_seeds_differ(rng):
    logits = rng.standard_normal((1, V)).astype(np.float32)
    params = SamplingParams(temperature=1.0)

    def draw(rows, position, counter_tokens=0):
        batch, flags = SamplingBatch.build(rows, ROWS, V,
                                           np.random.default_rng(secrets.randbits(32)))
        tokens, _ = sample_jit(jnp.asarray(np.tile(logits, (ROWS, 1))), batch, flags)
        return int(np.asarray(tokens)[position])

    seeded = (params, 1234, [1], [])
    unseeded = (SamplingParams(temperature=1.0), None, [1], [])
    alone = [draw([(params, 1234, [1], [7] * n)], 0) for n in range(12)]
    mixed = [draw([unseeded, unseeded, (params, 1234, [1], [7] * n)], 2) for n in range(12)]
    assert alone == mixed                      # position and neighbours do not matter
    assert len(set(alone)) > 1                 # each generated token advances the stream
    other = [draw([(params, 4321, [1], [7] * n)], 0) for n in range(12)]
    assert other != alone
    assert draw([seeded], 0) == alone[0]


def test_logprobs_match_torch(rng):
    rows = [(SamplingParams(temperature=0.0, logprobs=k), None, [1], []) for k in (0, 3, 5)]
    logits = rng.standard_normal((3, V)).astype(np.float32) * 3
    batch, flags = jax_batch(rows)
    tokens, (ids, lps, ranks) = sample_jit(padded_logits(logits), batch, flags)
    md = SamplingMetadata.from_states(torch_states(rows), V, "cpu")
    expected_tokens, expected = Sampler()(torch.from_numpy(logits), md)
    width = expected.token_ids.shape[1]
    assert np.asarray(tokens)[:3].tolist() == expected_tokens.tolist()
    np.testing.assert_array_equal(np.asarray(ids)[:3, :width], expected.token_ids)
    np.testing.assert_allclose(np.asarray(lps)[:3, :width], expected.logprobs, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ranks)[:3, :width], expected.ranks)


def test_flags_keep_plain_batches_cheap():
    greedy = [(SamplingParams(temperature=0.0, top_k=3, top_p=0.5), None, [1, 2], [3])] * 3
    _, flags = jax_batch(greedy)
    assert flags.all_greedy and not (flags.truncate or flags.penalties or flags.logprobs)
    plain = [(SamplingParams(temperature=0.7), None, [1], [])] * 3
    _, flags = jax_batch(plain)
    assert not (flags.all_greedy or flags.truncate or flags.penalties or flags.logprobs)
