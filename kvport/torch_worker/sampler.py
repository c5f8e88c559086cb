"""Batched token sampling for the torch worker, with vLLM's semantics.

One step's logits arrive as a [N, V] float32 tensor, one row per request that samples this step.
`SamplingMetadata.from_states` turns those requests' states into tensors once per step, with
flags that let the common cases skip work (an all-greedy batch without penalties is one argmax).

Order of processing (as in vLLM):
  1. raw logprobs (log_softmax of the model output), if any request asked for logprobs;
  2. min_tokens: eos (unless ignore_eos) and stop_token_ids are set to -inf while the request
     has fewer than min_tokens output tokens;
  3. penalties: repetition (prompt + output tokens), frequency and presence (output tokens);
  4. greedy rows take the argmax; random rows are divided by their temperature, truncated by
     top_k, then top_p, then min_p, and sampled with the exponential race
     argmax(probs / q), q ~ Exp(1), where a seeded row draws q from its own generator.

The input logits are never modified.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kvport.core.worker import SampledLogprobs
from kvport.torch_worker.request_state import RequestState

# Below this temperature a request is sampled greedily (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5


@dataclass
class SamplingMetadata:
    """Per-step sampling inputs as tensors on the logits' device, one row per sampling request.

    Optional tensors are None when no row needs the corresponding step.
    """
    vocab_size: int
    num_rows: int
    # Temperatures with greedy rows set to 1.0 (they never use it); None when all are 1.0.
    temperature: torch.Tensor | None
    greedy_mask: torch.Tensor | None        # [N] bool; None when all_greedy or all_random
    all_greedy: bool
    all_random: bool
    top_k: torch.Tensor | None              # [N] int64, vocab_size where disabled
    top_p: torch.Tensor | None              # [N] float32, 1.0 where disabled
    min_p: torch.Tensor | None              # [N] float32, 0.0 where disabled
    # Penalties: all None when no row has a non-default penalty.
    repetition_penalty: torch.Tensor | None  # [N] float32
    frequency_penalty: torch.Tensor | None   # [N] float32
    presence_penalty: torch.Tensor | None    # [N] float32
    prompt_token_ids: torch.Tensor | None    # [N, Lp] int64, padded with vocab_size
    output_token_ids: torch.Tensor | None    # [N, Lo] int64, padded with vocab_size
    # min_tokens: (row, token) pairs to set to -inf; None when no row is under min_tokens.
    min_tokens_rows: torch.Tensor | None
    min_tokens_cols: torch.Tensor | None
    # Row index -> that request's generator, for random rows of seeded requests.
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    num_unseeded_random: int = 0
    # Largest `logprobs` requested in the batch; None when no row asked.
    max_num_logprobs: int | None = None

    @property
    def no_penalties(self) -> bool:
        return self.repetition_penalty is None

    @classmethod
    def plain_greedy(cls, num_rows: int, vocab_size: int) -> "SamplingMetadata":
        """Argmax and nothing else: no tensors to build."""
        return cls(vocab_size=vocab_size, num_rows=num_rows, temperature=None,
                   greedy_mask=None, all_greedy=True, all_random=False, top_k=None, top_p=None,
                   min_p=None, repetition_penalty=None, frequency_penalty=None,
                   presence_penalty=None, prompt_token_ids=None, output_token_ids=None,
                   min_tokens_rows=None, min_tokens_cols=None)

    @classmethod
    def from_states(cls, states: list[RequestState], vocab_size: int,
                    device: torch.device | str) -> "SamplingMetadata":
        if all(s.plain_greedy for s in states):
            # the common serving case, checked in one pass: a step of 256 requests otherwise
            # spends about half a millisecond of host time building nothing
            return cls.plain_greedy(len(states), vocab_size)
        n = len(states)
        params = [s.sampling_params for s in states]
        V = vocab_size

        greedy = [p.temperature < SAMPLING_EPS for p in params]
        all_greedy = all(greedy)
        all_random = not any(greedy)
        random_rows = [i for i in range(n) if not greedy[i]]

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        temperature = greedy_mask = top_k = top_p = min_p = None
        generators: dict[int, torch.Generator] = {}
        num_unseeded = 0
        if not all_greedy:
            temps = [1.0 if greedy[i] else float(p.temperature) for i, p in enumerate(params)]
            if any(t != 1.0 for t in temps):
                temperature = tensor(temps, torch.float32)
            if not all_random:
                greedy_mask = tensor(greedy, torch.bool)
            ks = [V if greedy[i] or p.top_k is None else min(int(p.top_k), V)
                  for i, p in enumerate(params)]
            if any(k < V for k in ks):
                top_k = tensor(ks, torch.int64)
            ps = [1.0 if greedy[i] else float(p.top_p) for i, p in enumerate(params)]
            if any(x < 1.0 for x in ps):
                top_p = tensor(ps, torch.float32)
            mps = [0.0 if greedy[i] else float(p.min_p) for i, p in enumerate(params)]
            if any(x > SAMPLING_EPS for x in mps):
                min_p = tensor(mps, torch.float32)
            for i in random_rows:
                if states[i].generator is not None:
                    generators[i] = states[i].generator
                else:
                    num_unseeded += 1

        rep = [float(p.repetition_penalty) for p in params]
        freq = [float(p.frequency_penalty) for p in params]
        pres = [float(p.presence_penalty) for p in params]
        rep_t = freq_t = pres_t = prompt_t = output_t = None
        any_rep = any(abs(x - 1.0) > SAMPLING_EPS for x in rep)
        if any(has_penalties(p) for p in params):
            rep_t = tensor(rep, torch.float32)
            freq_t = tensor(freq, torch.float32)
            pres_t = tensor(pres, torch.float32)
            output_t = _padded([s.output_token_ids for s in states], V, device)
            if any_rep:
                prompt_t = _padded([s.prompt_token_ids for s in states], V, device)

        mt_rows: list[int] = []
        mt_cols: list[int] = []
        for i, (s, p) in enumerate(zip(states, params)):
            if len(s.output_token_ids) < p.min_tokens:
                banned = set(p.stop_token_ids or ())
                if not p.ignore_eos:
                    banned.update(p.eos_token_ids)
                for t in sorted(banned):
                    if 0 <= t < V:
                        mt_rows.append(i)
                        mt_cols.append(t)
        mt_rows_t = mt_cols_t = None
        if mt_rows:
            mt_rows_t = tensor(mt_rows, torch.int64)
            mt_cols_t = tensor(mt_cols, torch.int64)

        requested = [p.logprobs for p in params if p.logprobs is not None]
        max_num_logprobs = max(requested) if requested else None

        return cls(
            vocab_size=V, num_rows=n, temperature=temperature, greedy_mask=greedy_mask,
            all_greedy=all_greedy, all_random=all_random, top_k=top_k, top_p=top_p,
            min_p=min_p, repetition_penalty=rep_t, frequency_penalty=freq_t,
            presence_penalty=pres_t, prompt_token_ids=prompt_t, output_token_ids=output_t,
            min_tokens_rows=mt_rows_t, min_tokens_cols=mt_cols_t, generators=generators,
            num_unseeded_random=num_unseeded, max_num_logprobs=max_num_logprobs)


def has_penalties(params) -> bool:
    """Whether a repetition, frequency or presence penalty applies (the sampler then reads
    every row's output ids)."""
    return (abs(params.repetition_penalty - 1.0) > SAMPLING_EPS
            or abs(params.frequency_penalty) > SAMPLING_EPS
            or abs(params.presence_penalty) > SAMPLING_EPS)


def is_plain_greedy(params) -> bool:
    """Greedy with no penalties, no min_tokens and no logprobs: the sampler is one argmax."""
    return (params.temperature < SAMPLING_EPS and params.logprobs is None
            and not params.min_tokens and not has_penalties(params))


def _padded(lists: list[list[int]], pad: int, device) -> torch.Tensor:
    """[N, max_len] int64 tensor of `lists`, right-padded with `pad` (at least one column)."""
    width = max((len(x) for x in lists), default=0)
    arr = np.full((len(lists), max(width, 1)), pad, dtype=np.int64)
    for i, x in enumerate(lists):
        if x:
            arr[i, :len(x)] = x
    return torch.from_numpy(arr).to(device)


def _token_counts(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[N, V] int32 counts of each token id in each row of padded `tokens` (pad = V)."""
    n = tokens.shape[0]
    counts = torch.zeros(n, vocab_size + 1, dtype=torch.int32, device=tokens.device)
    counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=torch.int32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Repetition (prompt + output), frequency and presence (output) penalties, in place."""
    V = logits.shape[1]
    output_counts = _token_counts(md.output_token_ids, V)
    output_mask = output_counts > 0
    rep = md.repetition_penalty.unsqueeze(1)
    if md.prompt_token_ids is not None:
        seen = _token_counts(md.prompt_token_ids, V) > 0
        seen |= output_mask
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
    logits -= md.frequency_penalty.unsqueeze(1) * output_counts.to(logits.dtype)
    logits -= md.presence_penalty.unsqueeze(1) * output_mask.to(logits.dtype)
    return logits


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask logits outside each row's top_k, then outside its nucleus of mass top_p.

    The nucleus is the smallest set of most likely tokens (after top_k, renormalized) whose
    cumulative probability reaches top_p; the most likely token is always kept.
    """
    if top_k is None and top_p is None:
        return logits
    V = logits.shape[1]
    if top_p is None:
        # Top-k only: a partial top-k is cheaper than a full sort.
        max_k = int(top_k.max())
        values = logits.topk(max_k, dim=-1).values
        thresh = values.gather(1, (top_k.clamp(max=max_k) - 1).unsqueeze(1))
        thresh = thresh.masked_fill((top_k >= V).unsqueeze(1), float("-inf"))
        return logits.masked_fill_(logits < thresh, float("-inf"))

    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        positions = torch.arange(V, device=logits.device).unsqueeze(0)
        sorted_logits.masked_fill_(positions >= top_k.unsqueeze(1), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    exclusive_cum = probs.cumsum(dim=-1) - probs
    remove = exclusive_cum >= top_p.unsqueeze(1)
    remove &= (top_p < 1.0).unsqueeze(1)     # top_p == 1: no float-error truncation of the tail
    remove[:, 0] = False
    sorted_logits.masked_fill_(remove, float("-inf"))
    return logits.scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p times the row's largest probability."""
    probs = logits.softmax(dim=-1)
    thresh = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill_(probs < thresh, float("-inf"))


def _compute_logprobs(raw_logits: torch.Tensor, sampled: torch.Tensor,
                      num_logprobs: int) -> SampledLogprobs:
    logprobs = raw_logits.log_softmax(dim=-1)
    sampled_lp = logprobs.gather(1, sampled.unsqueeze(1))
    sampled_rank = (logprobs > sampled_lp).sum(dim=-1, keepdim=True) + 1
    ids = [sampled.unsqueeze(1)]
    lps = [sampled_lp]
    ranks = [sampled_rank]
    if num_logprobs > 0:
        k = min(num_logprobs, raw_logits.shape[1])
        top_lp, top_ids = logprobs.topk(k, dim=-1)
        ids.append(top_ids)
        lps.append(top_lp)
        ranks.append(torch.arange(1, k + 1, device=raw_logits.device)
                     .unsqueeze(0).expand(raw_logits.shape[0], k))
    return SampledLogprobs(
        token_ids=torch.cat(ids, dim=1).to(torch.int64).cpu().numpy(),
        logprobs=torch.cat(lps, dim=1).to(torch.float32).cpu().numpy(),
        ranks=torch.cat(ranks, dim=1).to(torch.int64).cpu().numpy(),
    )


class Sampler:
    """Samples one token per row of logits; see the module docstring for the semantics."""

    def __call__(self, logits: torch.Tensor, md: SamplingMetadata
                 ) -> tuple[torch.Tensor, SampledLogprobs | None]:
        assert logits.dim() == 2 and logits.shape[0] == md.num_rows, (logits.shape, md.num_rows)
        raw = logits
        needs_processing = not md.no_penalties or md.min_tokens_rows is not None

        if md.all_greedy and not needs_processing:
            sampled = raw.argmax(dim=-1)
        else:
            logits = raw.clone()
            if md.min_tokens_rows is not None:
                logits[md.min_tokens_rows, md.min_tokens_cols] = float("-inf")
            if not md.no_penalties:
                logits = apply_penalties(logits, md)
            if md.all_greedy:
                sampled = logits.argmax(dim=-1)
            else:
                greedy = None if md.all_random else logits.argmax(dim=-1)
                sampled = self._sample_random(logits, md)
                if greedy is not None:
                    sampled = torch.where(md.greedy_mask, greedy, sampled)

        sampled = sampled.to(torch.int64)
        logprobs = None
        if md.max_num_logprobs is not None:
            logprobs = _compute_logprobs(raw.float(), sampled, md.max_num_logprobs)
        return sampled, logprobs

    @staticmethod
    def _sample_random(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """Temperature, top_k, top_p, min_p, then the exponential race. Modifies `logits`."""
        if md.temperature is not None:
            logits.div_(md.temperature.unsqueeze(1))
        logits = apply_top_k_top_p(logits, md.top_k, md.top_p)
        if md.min_p is not None:
            logits = apply_min_p(logits, md.min_p)
        probs = logits.softmax(dim=-1)
        q = _exponential_noise(probs, md)
        # exponential_ may return 0 exactly; a masked token (prob 0) must never win via 0/0.
        q.clamp_min_(torch.finfo(q.dtype).tiny)
        return probs.div_(q).argmax(dim=-1)


def _exponential_noise(probs: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Exp(1) noise shaped like `probs`; rows with their own generator draw from it.

    On a CPU it is drawn as -log(U), U uniform in [0, 1) (the same distribution):
    `exponential_` measured 1.35 ms for a 49,152-token row there against 0.34 ms, a tenth of
    a 135M model's whole decode step at batch 1. On accelerators `exponential_` is one kernel
    where -log(U) would be three passes over [batch, vocab].
    """
    q = torch.empty_like(probs)
    fill = "uniform_" if q.is_cpu else "exponential_"
    if md.num_unseeded_random:
        getattr(q, fill)()
    for row, gen in md.generators.items():
        getattr(q[row], fill)(generator=gen)
    return q.log_().neg_() if q.is_cpu else q
