"""Token sampling in JAX with exactly the semantics of SamplingParams (and of the torch
worker's sampler, kvport/torch_worker/sampler.py).

Order of processing, as in vLLM:
  1. raw logprobs (log_softmax of the model output), if any request asked for logprobs;
  2. min_tokens: eos (unless ignore_eos) and stop_token_ids are set to -inf while the request
     has fewer than min_tokens output tokens;
  3. penalties: repetition (prompt + output tokens), frequency and presence (output tokens);
  4. greedy rows (temperature < 1e-5) take the argmax; random rows are divided by their
     temperature, truncated by top_k, then top_p, then min_p, and sampled with the exponential
     race argmax(probs / q), q ~ Exp(1).

Randomness: every row draws q from its own key, `fold_in(key(seed), number of tokens the
request has generated)`, so a seeded request gives the same tokens in any batch, and again
after preemption. Unseeded rows get a fresh seed per step from the worker's generator.

`SamplingBatch.build` (host, numpy) pads everything to the step's sequence bucket. Four
static flags (`SamplerFlags`) pick the stages that cost real work: an all-greedy batch is an
argmax, truncation sorts the vocabulary only when some row truncates, penalties count tokens
only when some row has one, and logprobs are computed only when asked. Cheap stages always
run with neutral values (min_tokens bans padded to at least 8 pairs, min_p 0, repetition
penalty 1 leave logits exactly as they are), and padded token lists are powers of two from
64, so the compilations stay few.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvport.core.sampling_params import SamplingParams
from kvport_tpu.buckets import bucket

SAMPLING_EPS = 1e-5      # below this temperature a request is sampled greedily
MAX_LOGPROBS = 20        # SamplingParams allows logprobs in [0, 20]


class SamplerFlags(NamedTuple):
    """Which costly stages run (static: one compilation per distinct value)."""
    all_greedy: bool
    truncate: bool       # some random row has top_k or top_p
    penalties: bool      # some row has a repetition, frequency or presence penalty
    logprobs: bool       # some row asked for logprobs


class SamplingBatch(NamedTuple):
    """One step's sampling inputs, [S] rows (padded rows are greedy and ignored)."""
    greedy: np.ndarray             # [S] bool
    temperature: np.ndarray        # [S] float32 (1.0 for greedy rows)
    top_k: np.ndarray              # [S] int32 (vocab size: disabled)
    top_p: np.ndarray              # [S] float32 (1.0: disabled)
    min_p: np.ndarray              # [S] float32 (0.0: disabled)
    repetition: np.ndarray         # [S] float32
    frequency: np.ndarray          # [S] float32
    presence: np.ndarray           # [S] float32
    prompt_tokens: np.ndarray      # [S, Lp] int32 padded with the vocab size
    output_tokens: np.ndarray      # [S, Lo] int32 padded with the vocab size
    min_tokens_rows: np.ndarray    # [M] int32
    min_tokens_cols: np.ndarray    # [M] int32 (vocab size: padding, dropped)
    seeds: np.ndarray              # [S, 2] uint32 (high, low words of the 64-bit seed)
    counters: np.ndarray           # [S] int32 tokens generated so far

    @classmethod
    def build(cls, rows: list[tuple[SamplingParams, int | None, list[int], list[int]]],
              num_rows: int, vocab_size: int,
              rng: np.random.Generator) -> tuple["SamplingBatch", SamplerFlags]:
        """rows: (params, seed or None, prompt token ids, output token ids) per request."""
        V, S = vocab_size, num_rows
        params = [r[0] for r in rows]
        greedy = np.ones(S, bool)
        greedy[:len(rows)] = [p.temperature < SAMPLING_EPS for p in params]
        temperature = np.ones(S, np.float32)
        top_k = np.full(S, V, np.int32)
        top_p = np.ones(S, np.float32)
        min_p = np.zeros(S, np.float32)
        for i, p in enumerate(params):
            if not greedy[i]:
                temperature[i] = p.temperature
                top_k[i] = V if p.top_k is None else min(int(p.top_k), V)
                top_p[i], min_p[i] = p.top_p, p.min_p
        repetition = np.ones(S, np.float32)
        frequency = np.zeros(S, np.float32)
        presence = np.zeros(S, np.float32)
        for i, p in enumerate(params):
            repetition[i], frequency[i] = p.repetition_penalty, p.frequency_penalty
            presence[i] = p.presence_penalty
        any_penalty = bool(np.any(np.abs(repetition - 1.0) > SAMPLING_EPS)
                           or np.any(np.abs(np.r_[frequency, presence]) > SAMPLING_EPS))
        prompt_tokens = _padded([r[2] for r in rows] if any_penalty else [], S, V)
        output_tokens = _padded([r[3] for r in rows] if any_penalty else [], S, V)
        mt_rows, mt_cols = _min_tokens_pairs(rows, V)
        seeds = np.zeros((S, 2), np.uint32)
        counters = np.zeros(S, np.int32)
        for i, (_, seed, _, output) in enumerate(rows):
            if seed is None:
                seed = int(rng.integers(0, 2**63))
            seeds[i] = (seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF
            counters[i] = len(output)
        flags = SamplerFlags(
            all_greedy=bool(greedy.all()),
            truncate=bool((top_k < V).any() or (top_p < 1.0).any()),
            penalties=any_penalty, logprobs=any(p.logprobs is not None for p in params))
        batch = cls(greedy, temperature, top_k, top_p, min_p, repetition, frequency,
                    presence, prompt_tokens, output_tokens, mt_rows, mt_cols, seeds, counters)
        return batch, flags


def _padded(lists: list[list[int]], num_rows: int, pad: int) -> np.ndarray:
    """[num_rows, bucketed width] int32, right-padded with `pad` ([S, 1] when empty)."""
    width = bucket(max((len(x) for x in lists), default=1), 64) if lists else 1
    out = np.full((num_rows, width), pad, np.int32)
    for i, x in enumerate(lists):
        out[i, :len(x)] = x
    return out


def _min_tokens_pairs(rows, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, token) pairs to ban while a row is under min_tokens, padded to a power of two."""
    pairs = []
    for i, (p, _, _, output) in enumerate(rows):
        if len(output) < p.min_tokens:
            banned = set(p.stop_token_ids or ())
            if not p.ignore_eos:
                banned.update(p.eos_token_ids)
            pairs += [(i, t) for t in sorted(banned) if 0 <= t < vocab_size]
    size = bucket(len(pairs), 8)
    rows_out = np.zeros(size, np.int32)
    cols_out = np.full(size, vocab_size, np.int32)
    if pairs:
        rows_out[:len(pairs)], cols_out[:len(pairs)] = zip(*pairs)
    return rows_out, cols_out


# ------------------------------------------------------------------------------ on device

def _token_counts(tokens: jnp.ndarray, vocab_size: int) -> jnp.ndarray:
    """[S, V] int32 counts of each token id per row of padded `tokens` (pad = V)."""
    rows = jnp.arange(tokens.shape[0])[:, None]
    counts = jnp.zeros((tokens.shape[0], vocab_size + 1), jnp.int32)
    return counts.at[rows, tokens].add(1)[:, :vocab_size]


def apply_penalties(logits: jnp.ndarray, b: SamplingBatch) -> jnp.ndarray:
    """Repetition (prompt + output), frequency and presence (output) penalties."""
    V = logits.shape[1]
    output_counts = _token_counts(b.output_tokens, V)
    output_mask = output_counts > 0
    seen = (_token_counts(b.prompt_tokens, V) > 0) | output_mask
    rep = b.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - b.frequency[:, None] * output_counts.astype(logits.dtype)
    return logits - b.presence[:, None] * output_mask.astype(logits.dtype)


def apply_top_k_top_p(logits: jnp.ndarray, top_k: jnp.ndarray,
                      top_p: jnp.ndarray) -> jnp.ndarray:
    """Mask logits outside each row's top_k, then outside its nucleus of mass top_p (the
    smallest set of most likely tokens, after top_k and renormalized, reaching top_p; the most
    likely token is always kept).

    Ties at the k-th value, as in the torch sampler: when no row of the batch has top_p < 1,
    top-k keeps every token tied with the k-th; otherwise top-k keeps the first k in sorted
    order. The choice depends on the batch in torch too; both are computed from one sort.
    """
    V = logits.shape[1]
    order = jnp.argsort(-logits, axis=-1, stable=True)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    kth = jnp.take_along_axis(sorted_logits, (jnp.minimum(top_k, V) - 1)[:, None], axis=-1)
    kth = jnp.where((top_k >= V)[:, None], -jnp.inf, kth)
    top_k_only = jnp.where(logits < kth, -jnp.inf, logits)

    positions = jnp.arange(V)[None, :]
    sorted_logits = jnp.where(positions >= top_k[:, None], -jnp.inf, sorted_logits)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    exclusive = jnp.cumsum(probs, axis=-1) - probs
    remove = (exclusive >= top_p[:, None]) & (top_p < 1.0)[:, None] & (positions > 0)
    sorted_logits = jnp.where(remove, -jnp.inf, sorted_logits)
    rows = jnp.arange(logits.shape[0])[:, None]
    nucleus = jnp.zeros_like(logits).at[rows, order].set(sorted_logits)
    return jnp.where(jnp.any(top_p < 1.0), nucleus, top_k_only)


def apply_min_p(logits: jnp.ndarray, min_p: jnp.ndarray) -> jnp.ndarray:
    """Mask tokens whose probability is below min_p times the row's largest probability."""
    probs = jax.nn.softmax(logits, axis=-1)
    thresh = probs.max(axis=-1, keepdims=True) * min_p[:, None]
    return jnp.where(probs < thresh, -jnp.inf, logits)


def _exponentials(b: SamplingBatch, vocab_size: int) -> jnp.ndarray:
    """[S, V] Exp(1) draws, row i from fold_in(key(seed_i), counter_i); never exactly 0."""
    def row(seed, counter):
        key = jax.random.fold_in(jax.random.wrap_key_data(seed, impl="threefry2x32"), counter)
        return jax.random.exponential(key, (vocab_size,), jnp.float32)
    q = jax.vmap(row)(b.seeds, b.counters)
    # a masked token (probability 0) must never win through 0 / 0
    return jnp.maximum(q, jnp.finfo(jnp.float32).tiny)


def _logprobs(raw: jnp.ndarray, sampled: jnp.ndarray):
    """(ids, logprobs, ranks) [S, 1 + MAX_LOGPROBS]: the sampled token, then the top ones."""
    logprobs = jax.nn.log_softmax(raw, axis=-1)
    sampled_lp = jnp.take_along_axis(logprobs, sampled[:, None], axis=-1)
    sampled_rank = (logprobs > sampled_lp).sum(axis=-1, keepdims=True) + 1
    k = min(MAX_LOGPROBS, raw.shape[1])
    top_lp, top_ids = jax.lax.top_k(logprobs, k)
    ranks = jnp.broadcast_to(jnp.arange(1, k + 1), top_ids.shape)
    return (jnp.concatenate([sampled[:, None], top_ids], axis=1),
            jnp.concatenate([sampled_lp, top_lp], axis=1),
            jnp.concatenate([sampled_rank, ranks], axis=1))


def penalized_logits(logits: jnp.ndarray, b: SamplingBatch, flags: SamplerFlags) -> jnp.ndarray:
    """Stages 2-3: min_tokens bans, then penalties. Greedy rows take the argmax of this."""
    x = logits.at[b.min_tokens_rows, b.min_tokens_cols].set(-jnp.inf, mode="drop")
    return apply_penalties(x, b) if flags.penalties else x


def truncated_logits(x: jnp.ndarray, b: SamplingBatch, flags: SamplerFlags) -> jnp.ndarray:
    """Stage 4 before the draw: temperature, top_k, top_p, min_p (masked tokens at -inf)."""
    y = x / b.temperature[:, None]
    if flags.truncate:
        y = apply_top_k_top_p(y, b.top_k, b.top_p)
    return apply_min_p(y, b.min_p)


def sample(logits: jnp.ndarray, b: SamplingBatch, flags: SamplerFlags):
    """logits [S, V] float32 -> (sampled [S] int32, logprobs triple or None)."""
    x = penalized_logits(logits, b, flags)
    sampled = jnp.argmax(x, axis=-1).astype(jnp.int32)
    if not flags.all_greedy:
        probs = jax.nn.softmax(truncated_logits(x, b, flags), axis=-1)
        q = _exponentials(b, logits.shape[1])
        random = jnp.argmax(probs / q, axis=-1).astype(jnp.int32)
        sampled = jnp.where(b.greedy, sampled, random)
    return sampled, (_logprobs(logits, sampled) if flags.logprobs else None)


sample_jit = jax.jit(sample, static_argnames=("flags",))
