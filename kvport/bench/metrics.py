"""Per-request records and their summary, with vLLM's `benchmark_serving` definitions.

- TTFT: request sent -> first streamed chunk carrying a choice.
- latency (E2EL): request sent -> last streamed chunk carrying a choice.
- ITL: the gaps between consecutive such chunks (all requests pooled).
- TPOT: (latency - TTFT) / (output_tokens - 1), per request with more than one token.
- output throughput: sum of output tokens / wall time of the sweep point;
  request throughput: completed requests / wall time.
- percentiles: linear interpolation between closest ranks (numpy's default).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestResult:
    """What one streamed request produced. Times are seconds; `chunk_times` are relative to
    the send time, one per chunk that carried a choice."""
    success: bool = False
    error: str | None = None
    chunk_times: list[float] = field(default_factory=list)
    text_chunks: int = 0                 # chunks whose text was non-empty (token-count fallback)
    usage_completion_tokens: int | None = None
    usage_prompt_tokens: int | None = None
    output_tokens: int = 0               # the count used for metrics (usage, else text chunks)

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] if self.chunk_times else None

    @property
    def latency(self) -> float | None:
        return self.chunk_times[-1] if self.chunk_times else None

    @property
    def itl(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> float | None:
        """None for one-token outputs: vLLM leaves them out of TPOT."""
        if self.output_tokens <= 1 or not self.chunk_times:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), interpolated like numpy.percentile; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution_ms(values: list[float]) -> dict[str, float | None]:
    """mean / p50 / p99 of seconds, in milliseconds."""
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    return {"mean": 1000 * sum(values) / len(values),
            "p50": 1000 * percentile(values, 50), "p99": 1000 * percentile(values, 99)}


def summarize(results: list[RequestResult], duration_s: float,
              expected_output_tokens: int | None = None) -> dict[str, Any]:
    """One sweep point's metrics. `short_outputs` counts successful requests that produced
    fewer tokens than asked for: non-zero means the server did not honour ignore_eos."""
    ok = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    output_tokens = sum(r.output_tokens for r in ok)
    summary: dict[str, Any] = {
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(failed),
        "duration_s": duration_s,
        "total_output_tokens": output_tokens,
        "total_prompt_tokens": sum(r.usage_prompt_tokens or 0 for r in ok),
        "output_throughput": output_tokens / duration_s if duration_s > 0 else 0.0,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
        "ttft_ms": distribution_ms([r.ttft for r in ok]),
        "tpot_ms": distribution_ms([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": distribution_ms([gap for r in ok for gap in r.itl]),
        "e2el_ms": distribution_ms([r.latency for r in ok]),
    }
    if expected_output_tokens is not None:
        summary["short_outputs"] = sum(r.output_tokens < expected_output_tokens for r in ok)
    if failed:
        summary["errors"] = sorted({r.error or "unknown" for r in failed})[:5]
    return summary
