"""Tests for the torch worker's sampler: greedy, truncation, seeding, penalties, logprobs."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from kvport.core.sampling_params import SamplingParams
from kvport.torch_worker.request_state import RequestState
from kvport.torch_worker.sampler import (Sampler, SamplingMetadata, apply_penalties)

DEVICE = torch.device("cpu")


def make_state(params: SamplingParams, prompt=None, output=None, seed=None,
               req_id="r") -> RequestState:
    gen = torch.Generator(DEVICE).manual_seed(seed) if seed is not None else None
    return RequestState(req_id=req_id, prompt_token_ids=list(prompt or [1, 2, 3]),
                        output_token_ids=list(output or []), sampling_params=params,
                        block_ids=[], num_computed_tokens=0, generator=gen)


def sample(states, logits):
    md = SamplingMetadata.from_states(states, logits.shape[1], logits.device)
    return Sampler()(logits, md)


def draw_many(params: SamplingParams, logits_row: torch.Tensor, n: int) -> np.ndarray:
    """n independent samples of one request's distribution (n identical unseeded rows)."""
    states = [make_state(params) for _ in range(n)]
    logits = logits_row.unsqueeze(0).expand(n, -1).contiguous()
    ids, _ = sample(states, logits)
    return ids.numpy()


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    n = counts.sum()
    expected = probs * n
    keep = expected > 0
    assert counts[~keep].sum() == 0, "samples where the expected probability is zero"
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


# Chi-square critical values at p = 1e-4 (fixed seeds make the tests deterministic anyway).
def chi2_limit(df: int) -> float:
    return df + 6.0 * math.sqrt(2.0 * df) + 10.0


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


# ---------------------------------------------------------------------------------- greedy


def test_greedy_equals_argmax():
    logits = torch.randn(8, 100)
    raw = logits.clone()
    states = [make_state(SamplingParams(temperature=0.0)) for _ in range(8)]
    ids, lps = sample(states, logits)
    assert ids.dtype == torch.int64 and ids.shape == (8,)
    assert torch.equal(ids, raw.argmax(dim=-1))
    assert lps is None
    assert torch.equal(logits, raw), "sampler must not modify the input logits"


def test_all_greedy_metadata_skips_work():
    states = [make_state(SamplingParams(temperature=0.0, top_k=3, top_p=0.5)) for _ in range(4)]
    md = SamplingMetadata.from_states(states, 50, DEVICE)
    assert md.all_greedy and not md.all_random
    assert md.temperature is None and md.top_k is None and md.top_p is None
    assert md.min_p is None and md.no_penalties and md.min_tokens_rows is None
    assert md.max_num_logprobs is None and not md.generators


def test_greedy_rows_in_mixed_batch():
    logits = torch.randn(6, 40)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5, top_k=5),
              SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_p=0.5),
              SamplingParams(temperature=0.0, seed=3), SamplingParams(temperature=1.0)]
    states = [make_state(p, seed=p.seed) for p in params]
    md = SamplingMetadata.from_states(states, 40, DEVICE)
    assert not md.all_greedy and not md.all_random
    assert list(md.generators) == [], "a greedy seeded row needs no generator"
    ids, _ = Sampler()(logits, md)
    for i in (0, 2, 4):
        assert ids[i] == logits[i].argmax()
    assert 0 <= int(ids.min()) and int(ids.max()) < 40


# ------------------------------------------------------------------------------ truncation


def test_top_k_never_samples_outside_top_k():
    V = 50
    logits_row = torch.randn(V) * 1.5      # peaked but every token has real mass
    for k in (1, 3, 10):
        draws = draw_many(SamplingParams(temperature=1.0, top_k=k), logits_row, 4000)
        allowed = set(torch.topk(logits_row, k).indices.tolist())
        assert set(draws.tolist()) <= allowed
        assert set(draws.tolist()) == allowed or k == 1, "all top-k tokens should appear"
    # Without top_k, tokens outside the top 10 do show up (the test above is not vacuous).
    draws = draw_many(SamplingParams(temperature=1.0), logits_row, 4000)
    assert not set(draws.tolist()) <= set(torch.topk(logits_row, 10).indices.tolist())


def test_top_k_per_row_in_batch():
    V = 30
    logits = torch.randn(4, V)
    ks = [1, 2, None, 7]
    for _ in range(50):
        states = [make_state(SamplingParams(top_k=k)) for k in ks]
        ids, _ = sample(states, logits)
        for i, k in enumerate(ks):
            if k is not None:
                assert int(ids[i]) in set(torch.topk(logits[i], k).indices.tolist())


def nucleus(probs: np.ndarray, top_p: float) -> set[int]:
    """Smallest set of most likely tokens with cumulative probability >= top_p."""
    order = np.argsort(-probs, kind="stable")
    cum = 0.0
    allowed = set()
    for t in order:
        allowed.add(int(t))
        cum += probs[t]
        if cum >= top_p:
            break
    return allowed


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9])
def test_top_p_respects_nucleus(top_p):
    V = 30
    logits_row = torch.randn(V)
    T = 0.9
    probs = torch.softmax(logits_row.double() / T, dim=-1).numpy()
    allowed = nucleus(probs, top_p)
    draws = draw_many(SamplingParams(temperature=T, top_p=top_p), logits_row, 20000)
    assert set(draws.tolist()) <= allowed
    # Within the nucleus, frequencies follow the renormalized distribution.
    target = np.zeros(V)
    idx = sorted(allowed)
    target[idx] = probs[idx] / probs[idx].sum()
    counts = np.bincount(draws, minlength=V)
    assert chi_square(counts, target) < chi2_limit(max(len(allowed) - 1, 1))


def test_top_p_always_keeps_top_token():
    logits_row = torch.randn(20)
    draws = draw_many(SamplingParams(top_p=1e-6), logits_row, 500)
    assert set(draws.tolist()) == {int(logits_row.argmax())}


def test_top_k_then_top_p():
    V = 40
    logits_row = torch.randn(V)
    k, p = 8, 0.7
    topk = torch.topk(logits_row, k).indices
    probs_k = np.zeros(V)
    probs_k[topk.numpy()] = torch.softmax(logits_row[topk].double(), dim=-1).numpy()
    allowed = nucleus(probs_k, p)
    draws = draw_many(SamplingParams(top_k=k, top_p=p), logits_row, 5000)
    assert set(draws.tolist()) <= allowed
    assert len(set(draws.tolist())) == len(allowed)


@pytest.mark.parametrize("min_p", [0.05, 0.2, 0.5])
def test_min_p(min_p):
    V = 30
    logits_row = torch.randn(V) * 1.5
    T = 1.2
    probs = torch.softmax(logits_row.double() / T, dim=-1).numpy()
    allowed = {t for t in range(V) if probs[t] >= min_p * probs.max()}
    draws = draw_many(SamplingParams(temperature=T, min_p=min_p), logits_row, 20000)
    assert set(draws.tolist()) <= allowed
    target = np.zeros(V)
    idx = sorted(allowed)
    target[idx] = probs[idx] / probs[idx].sum()
    counts = np.bincount(draws, minlength=V)
    assert chi_square(counts, target) < chi2_limit(max(len(allowed) - 1, 1))


# ----------------------------------------------------------------------------- distribution


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
def test_empirical_distribution_matches_softmax(T):
    V = 8
    logits_row = torch.randn(V)
    n = 40000
    draws = draw_many(SamplingParams(temperature=T), logits_row, n)
    probs = torch.softmax(logits_row.double() / T, dim=-1).numpy()
    counts = np.bincount(draws, minlength=V)
    assert chi_square(counts, probs) < chi2_limit(V - 1)
    assert np.abs(counts / n - probs).max() < 0.02


def test_temperature_near_zero_is_near_greedy():
    V = 50
    logits_row = torch.randn(V)
    top = int(logits_row.argmax())
    logits_row[top] = logits_row.max() + 0.5      # a clear winner
    draws = draw_many(SamplingParams(temperature=1e-3), logits_row, 2000)
    assert set(draws.tolist()) == {top}
    # Below the sampling epsilon, a request is greedy (no generator use, no randomness).
    md = SamplingMetadata.from_states([make_state(SamplingParams(temperature=1e-6), seed=1)],
                                      V, DEVICE)
    assert md.all_greedy


def test_high_temperature_spreads():
    V = 20
    logits_row = torch.randn(V) * 3
    low = np.bincount(draws := draw_many(SamplingParams(temperature=1.0), logits_row, 4000),
                      minlength=V) / len(draws)
    high = np.bincount(draw_many(SamplingParams(temperature=100.0), logits_row, 4000),
                       minlength=V) / 4000
    assert low.max() > 0.3
    assert high.max() < 0.1
    assert (high > 0).sum() == V


# ---------------------------------------------------------------------------------- seeding


def run_seeded(seed, step_logits, position, batch_size, global_seed, params=None):
    """Sample a seeded request for len(step_logits) steps at `position` in a batch of noise."""
    params = params or SamplingParams(temperature=1.0, seed=seed)
    state = make_state(params, seed=seed)
    torch.manual_seed(global_seed)
    out = []
    for logits_row in step_logits:
        others = [make_state(SamplingParams(temperature=0.7 + 0.1 * j)) for j in
                  range(batch_size - 1)]
        states = others[:position] + [state] + others[position:]
        logits = torch.randn(batch_size, logits_row.shape[0]) * 2
        logits[position] = logits_row
        ids, _ = sample(states, logits)
        tok = int(ids[position])
        state.output_token_ids.append(tok)
        out.append(tok)
    return out


def test_seeded_reproducible_across_runs_and_batches():
    V = 64
    g = torch.Generator().manual_seed(99)
    step_logits = [torch.randn(V, generator=g) for _ in range(25)]
    a = run_seeded(7, step_logits, position=0, batch_size=1, global_seed=0)
    b = run_seeded(7, step_logits, position=0, batch_size=1, global_seed=1)
    c = run_seeded(7, step_logits, position=3, batch_size=5, global_seed=2)
    d = run_seeded(7, step_logits, position=1, batch_size=8, global_seed=3)
    assert a == b == c == d
    # With truncation and penalties in play, too.
    p = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.01,
                       frequency_penalty=0.5, seed=11)
    e = run_seeded(11, step_logits, 0, 1, 0, params=p)
    f = run_seeded(11, step_logits, 2, 6, 5, params=p)
    assert e == f


def test_different_seeds_differ():
    V = 64
    g = torch.Generator().manual_seed(5)
    step_logits = [torch.randn(V, generator=g) * 0.5 for _ in range(20)]
    seqs = {tuple(run_seeded(s, step_logits, 0, 2, 0)) for s in range(5)}
    assert len(seqs) == 5


def test_unseeded_rows_vary():
    V = 64
    logits = torch.randn(1, V) * 0.5
    seen = {int(sample([make_state(SamplingParams())], logits)[0][0]) for _ in range(30)}
    assert len(seen) > 3


# -------------------------------------------------------------------------------- penalties


def reference_penalties(logits_row, prompt, output, rep, freq, pres):
    out = logits_row.clone()
    for t in set(prompt) | set(output):
        v = float(out[t])
        out[t] = v / rep if v > 0 else v * rep
    for t, c in Counter(output).items():
        out[t] -= freq * c + pres
    return out


def test_penalties_match_reference():
    V = 60
    rng = np.random.default_rng(0)
    cases = [(1.0, 0.0, 0.0), (1.3, 0.0, 0.0), (0.7, 0.0, 0.0), (1.0, 0.8, 0.0),
             (1.0, 0.0, -1.2), (1.5, 1.1, 0.6), (1.0, -0.5, 2.0), (2.0, 2.0, 2.0)]
    states, expected = [], []
    logits = torch.randn(len(cases), V) * 2
    for i, (rep, freq, pres) in enumerate(cases):
        prompt = rng.integers(0, V, size=int(rng.integers(1, 20))).tolist()
        output = rng.integers(0, V, size=int(rng.integers(0, 30))).tolist()
        params = SamplingParams(temperature=0.0, repetition_penalty=rep,
                                frequency_penalty=freq, presence_penalty=pres)
        states.append(make_state(params, prompt=prompt, output=output))
        expected.append(reference_penalties(logits[i], prompt, output, rep, freq, pres))
    expected = torch.stack(expected)
    md = SamplingMetadata.from_states(states, V, DEVICE)
    assert not md.no_penalties
    got = apply_penalties(logits.clone(), md)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    # End to end: greedy rows pick the argmax of the penalized logits.
    ids, _ = Sampler()(logits, md)
    assert torch.equal(ids, expected.argmax(dim=-1))


def test_frequency_presence_ignore_prompt_tokens():
    V = 10
    logits = torch.randn(1, V)
    logits[0, 4] = 5.0
    # Token 4 only in the prompt: frequency/presence penalties do not touch it.
    state = make_state(SamplingParams(temperature=0.0, frequency_penalty=2.0,
                                      presence_penalty=2.0), prompt=[4, 4, 4], output=[1])
    md = SamplingMetadata.from_states([state], V, DEVICE)
    got = apply_penalties(logits.clone(), md)
    assert got[0, 4] == logits[0, 4]
    assert torch.isclose(got[0, 1], logits[0, 1] - 4.0)


def test_penalties_change_sampling():
    V = 10
    logits = torch.randn(1, V)
    logits[0, 6] = 4.0
    logits[0, 2] = 3.0
    plain = make_state(SamplingParams(temperature=0.0), prompt=[6], output=[6, 6])
    penal = make_state(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt=[6],
                       output=[])
    ids, _ = sample([plain, penal], logits.expand(2, V).contiguous())
    assert ids.tolist() == [6, 2]


# ------------------------------------------------------------------------------- min_tokens


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_suppresses_eos_and_stop_ids(temperature):
    V = 20
    eos, stop = 3, 7
    logits = torch.randn(1, V)
    logits[0, eos] = 30.0
    logits[0, stop] = 29.0
    params = SamplingParams(temperature=temperature, min_tokens=4, stop_token_ids=[stop],
                            eos_token_ids=(eos,))
    for n_out in range(4):
        for _ in range(20):
            ids, _ = sample([make_state(params, output=[1] * n_out)], logits)
            assert int(ids[0]) not in (eos, stop)
    # Once reached, nothing is suppressed.
    ids, _ = sample([make_state(SamplingParams(temperature=0.0, min_tokens=4,
                                               stop_token_ids=[stop], eos_token_ids=(eos,)),
                                output=[1] * 4)], logits)
    assert int(ids[0]) == eos


def test_min_tokens_with_ignore_eos_still_suppresses_stop_ids():
    V = 20
    eos, stop = 3, 7
    logits = torch.randn(2, V)
    logits[:, eos] = 30.0
    logits[:, stop] = 40.0
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[stop],
                            ignore_eos=True, eos_token_ids=(eos,))
    states = [make_state(params, output=[5]), make_state(params, output=[5, 5])]
    ids, _ = sample(states, logits)
    assert ids.tolist() == [eos, stop]


def test_min_tokens_per_row():
    V = 16
    logits = torch.randn(3, V)
    logits[:, 0] = 20.0
    p = SamplingParams(temperature=0.0, min_tokens=2, eos_token_ids=(0,))
    states = [make_state(p, output=[]), make_state(SamplingParams(temperature=0.0,
                                                                  eos_token_ids=(0,))),
              make_state(p, output=[1, 2])]
    ids, _ = sample(states, logits)
    assert int(ids[0]) == int(logits[0, 1:].argmax()) + 1
    assert ids[1:].tolist() == [0, 0]


# --------------------------------------------------------------------------------- logprobs


def test_logprobs_from_raw_logits():
    V = 50
    N = 6
    logits = torch.randn(N, V) * 2
    raw_lp = torch.log_softmax(logits, dim=-1)
    params = [SamplingParams(temperature=0.0, logprobs=3),
              SamplingParams(temperature=2.5, logprobs=5, repetition_penalty=1.8),
              SamplingParams(temperature=0.7, top_k=4, logprobs=0),
              SamplingParams(temperature=1.0),   # did not ask: row present, ignored
              SamplingParams(temperature=5.0, frequency_penalty=2.0, logprobs=1),
              SamplingParams(temperature=0.0, presence_penalty=-2.0, logprobs=2)]
    states = [make_state(p, prompt=[1, 2, 3], output=[int(logits[i].argmax()), 4])
              for i, p in enumerate(params)]
    ids, lps = sample(states, logits)
    assert lps is not None
    k = 5
    assert lps.token_ids.shape == lps.logprobs.shape == lps.ranks.shape == (N, 1 + k)
    assert lps.token_ids[:, 0].tolist() == ids.tolist()
    # Values are log_softmax of the raw logits at the returned ids.
    expect = raw_lp.gather(1, torch.from_numpy(lps.token_ids)).numpy()
    np.testing.assert_allclose(lps.logprobs, expect, rtol=1e-5, atol=1e-6)
    # Top-k ids are the true top-k, ranked 1..k.
    true_top = torch.topk(logits, k, dim=-1).indices.numpy()
    np.testing.assert_array_equal(lps.token_ids[:, 1:], true_top)
    np.testing.assert_array_equal(lps.ranks[:, 1:], np.tile(np.arange(1, k + 1), (N, 1)))
    # Rank of the sampled token within the raw distribution, computed independently.
    for i in range(N):
        order = torch.argsort(logits[i], descending=True).tolist()
        assert lps.ranks[i, 0] == order.index(int(ids[i])) + 1


def test_logprobs_rank_of_argmax_is_one():
    V = 30
    logits = torch.randn(4, V)
    states = [make_state(SamplingParams(temperature=0.0, logprobs=0)) for _ in range(4)]
    ids, lps = sample(states, logits)
    assert lps.token_ids.shape == (4, 1)
    assert (lps.ranks[:, 0] == 1).all()
    np.testing.assert_allclose(lps.logprobs[:, 0],
                               torch.log_softmax(logits, -1).max(-1).values.numpy(), rtol=1e-6)


def test_logprobs_of_non_argmax_samples():
    V = 8
    logits = torch.randn(500, V) * 0.3     # flat: many samples are not the argmax
    states = [make_state(SamplingParams(temperature=1.0, logprobs=2)) for _ in range(500)]
    ids, lps = sample(states, logits)
    greater = (logits > logits.gather(1, ids.unsqueeze(1))).sum(-1) + 1
    np.testing.assert_array_equal(lps.ranks[:, 0], greater.numpy())
    assert (lps.ranks[:, 0] > 1).sum() > 100


def test_empty_batch():
    md = SamplingMetadata.from_states([], 10, DEVICE)
    ids, lps = Sampler()(torch.randn(0, 10), md)
    assert ids.shape == (0,) and lps is None
