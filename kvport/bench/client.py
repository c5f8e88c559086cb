"""The load generator: streamed `/v1/completions` requests at a bounded concurrency.

One coroutine per request, gated by a semaphore, all on one httpx.AsyncClient. The request
body is vLLM's benchmark body (stream + include_usage + ignore_eos, greedy), so the numbers
are comparable with `vllm bench serve`.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx

from kvport.bench.metrics import RequestResult

# Long enough for any request at c=32 on a slow CPU; short enough that a dead server does
# not hang the benchmark forever. Connecting is separately bounded.
REQUEST_TIMEOUT = httpx.Timeout(3600.0, connect=60.0)


def normalize_base_url(url: str) -> str:
    """'http://h:p', 'http://h:p/', 'http://h:p/v1/' -> 'http://h:p/v1'."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def new_client(concurrency: int) -> httpx.AsyncClient:
    # No keep-alive: some servers close idle sockets, and a request on a dead pooled socket
    # fails spuriously. A loopback connect costs ~0.1 ms, noise next to a TTFT.
    limits = httpx.Limits(max_connections=max(concurrency, 1) + 4, max_keepalive_connections=0)
    return httpx.AsyncClient(timeout=REQUEST_TIMEOUT, limits=limits)


def first_model(base_url: str) -> str:
    """The id of the server's first model (GET /v1/models), as vLLM's client does."""
    response = httpx.get(normalize_base_url(base_url) + "/models", timeout=60.0)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


@dataclass
class CompletionRequest:
    prompt: str
    max_tokens: int


async def stream_completion(client: httpx.AsyncClient, base_url: str, model: str,
                            request: CompletionRequest,
                            count_chunks_as_tokens: bool = False) -> RequestResult:
    """Send one streamed completion and time its chunks. Never raises: errors are recorded.

    A request without a `usage` chunk fails, unless `count_chunks_as_tokens` (the server is
    known not to send usage) in which case every non-empty text chunk counts as one token.
    """
    body = {"model": model, "prompt": request.prompt, "max_tokens": request.max_tokens,
            "temperature": 0.0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    result = RequestResult()
    start = time.perf_counter()
    try:
        async with client.stream("POST", base_url + "/completions", json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread())[:200].decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {detail}"
                return result
            async for line in response.aiter_lines():
                now = time.perf_counter()   # taken first: parsing must not delay the stamp
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                data = json.loads(payload)
                if data.get("error"):
                    result.error = f"server error: {str(data['error'])[:200]}"
                    return result
                if data.get("choices"):
                    result.chunk_times.append(now - start)
                    if data["choices"][0].get("text"):
                        result.text_chunks += 1
                usage = data.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    result.usage_completion_tokens = int(usage["completion_tokens"])
                    result.usage_prompt_tokens = usage.get("prompt_tokens")
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]
        return result
    if not result.chunk_times:
        result.error = "no streamed chunk carried a choice"
    elif result.usage_completion_tokens is not None:
        result.output_tokens = result.usage_completion_tokens
        result.success = True
    elif count_chunks_as_tokens:
        result.output_tokens = result.text_chunks
        result.success = True
    else:
        result.error = "no usage in the stream (stream_options.include_usage ignored)"
    return result


async def run_requests(base_url: str, model: str, requests: list[CompletionRequest],
                       concurrency: int, count_chunks_as_tokens: bool = False
                       ) -> tuple[list[RequestResult], float]:
    """Run all requests, at most `concurrency` in flight; returns (results, wall seconds)."""
    semaphore = asyncio.Semaphore(concurrency)

    async with new_client(concurrency) as client:
        async def gated(request: CompletionRequest) -> RequestResult:
            async with semaphore:
                return await stream_completion(client, base_url, model, request,
                                               count_chunks_as_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(gated(r) for r in requests))
        return list(results), time.perf_counter() - start
