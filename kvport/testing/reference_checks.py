"""Judge generated tokens against the numpy reference model, teacher-forced.

For each request, the reference computes the logits of prompt + generated tokens in one
pass; the token generated at step j must then be what the sampling rule allows at that
position (greedy: the argmax; top-k: among the k best; top-p: inside the nucleus), up to a
tolerance for near-ties that depends on the dtype the device computed in. This works for any
worker and any batch composition, scheduling, prefix caching or preemption.
"""
from __future__ import annotations

import numpy as np

# How far (in logits) a chosen token may fall short of the rule's bound: rounding of the
# whole model in that dtype. The kit's logits have a standard deviation of about 3.
LOGIT_TOLERANCE = {"float32": 2e-3, "bfloat16": 0.3, "float16": 0.1}


def step_logits(model, prompt: list[int], generated: list[int]) -> np.ndarray:
    """[len(generated), vocab] reference logits that chose each generated token."""
    logits = model.logits(list(prompt) + list(generated))
    return logits[len(prompt) - 1: len(prompt) - 1 + len(generated)]


def greedy_violations(model, prompt, generated, dtype: str) -> list[str]:
    """Every position where the token is not the reference's argmax (beyond tolerance)."""
    tol = LOGIT_TOLERANCE[dtype]
    problems = []
    for j, (row, token) in enumerate(zip(step_logits(model, prompt, generated), generated)):
        best = int(row.argmax())
        if row[best] - row[token] > tol:
            problems.append(f"generated token {j} is {token}, the reference's greedy choice is "
                            f"{best} (logit {row[best]:.4f} vs {row[token]:.4f}, gap "
                            f"{row[best] - row[token]:.4f} > tolerance {tol} for {dtype})")
    return problems


def allowed_tokens(row: np.ndarray, temperature: float, top_k: int | None, top_p: float,
                   tol: float) -> np.ndarray:
    """Tokens the sampler may pick from logits `row`: top_k, then top_p over the
    renormalized survivors (vLLM's order), widened by `tol` logits for near-ties."""
    scaled = row / temperature
    order = np.argsort(-scaled, kind="stable")
    kept = len(order) if top_k is None else min(top_k, len(order))
    if top_p < 1.0:
        head = scaled[order[:kept]]
        probs = np.exp(head - head.max())
        probs /= probs.sum()
        exclusive = np.cumsum(probs) - probs
        kept = max(1, int((exclusive < top_p).sum()))
    threshold = scaled[order[kept - 1]] - tol / temperature
    return np.flatnonzero(scaled >= threshold)


def bound_violations(model, prompt, generated, dtype: str, temperature: float,
                     top_k: int | None, top_p: float) -> list[str]:
    tol = LOGIT_TOLERANCE[dtype]
    problems = []
    for j, (row, token) in enumerate(zip(step_logits(model, prompt, generated), generated)):
        allowed = allowed_tokens(row, temperature, top_k, top_p, tol)
        if token not in allowed:
            rank = int((row > row[token]).sum()) + 1
            problems.append(f"generated token {j} is {token}, rank {rank} in the reference "
                            f"distribution, outside top_k={top_k}, top_p={top_p} at "
                            f"temperature {temperature} (allowed: {sorted(allowed.tolist())})")
    return problems
