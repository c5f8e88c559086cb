"""The request plumbing /v1/completions and /v1/chat/completions share.

BaseServing owns what both endpoints do the same way: check the model name and the context
length in the API process (a 400 before the engine sees the request), run engine requests with
per-request metrics, and answer either as one JSON body or as an SSE stream. Both answers
watch the client: one that goes away cancels the engine request, which frees its KV blocks.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

import anyio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from kvport.api.errors import APIError, sse_error
from kvport.api.protocol import PromptTokensDetails, UsageInfo
from kvport.core.request import Logprob, RequestDelta
from kvport.core.sampling_params import SamplingParams

_DONE = object()
LOGPROB_FLOOR = -9999.0   # JSON has no -inf; OpenAI and vLLM clamp the same way


class ClientDisconnected(Exception):
    """The client closed its connection before the answer was ready."""


# --------------------------------------------------------------------- shared plumbing
async def wait_for_disconnect(request: Request) -> None:
    """Return once the client has gone (after the body was read, receive() waits for it)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def race_disconnect(request: Request, awaitable):
    """Await `awaitable`; if the client leaves first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:   # the server is stopping this handler: stop the work too
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)   # runs the engine abort now
    raise ClientDisconnected()


class SSEResponse(StreamingResponse):
    """A stream that always watches for the client leaving, and always closes its source.

    Starlette only listens for disconnects under ASGI < 2.4 and never closes the body
    iterator; here a disconnect cancels the stream (aborting the engine request) on any server.
    """
    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close):
        super().__init__(content, headers={"Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:   # ASGI 2.4 servers raise on sending to a gone client
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self.on_close()


def sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


async def merge(streams: list[AsyncIterator[RequestDelta]]
                ) -> AsyncIterator[tuple[int, RequestDelta]]:
    """Interleave several prompts' deltas as (prompt index, delta); closing stops them all."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for delta in only:
                yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestDelta]) -> None:
        try:
            async with aclosing(stream):
                async for delta in stream:
                    queue.put_nowait((index, delta))
            queue.put_nowait((index, _DONE))
        except Exception as exc:   # surfaces in the consumer, which stops every prompt
            queue.put_nowait((index, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        pending = len(tasks)
        while pending:
            index, item = await queue.get()
            if item is _DONE:
                pending -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class ChoiceState:
    """Everything one choice produced, for the non-streamed answer."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class Accumulator:
    """Choices and usage of one HTTP request; choice index = prompt index * n + sample."""

    def __init__(self, n: int):
        self.n = n
        self.choices: dict[int, ChoiceState] = {}
        self.prompt_tokens: dict[int, int] = {}
        self.cached_tokens: dict[int, int] = {}

    def add(self, prompt_index: int, delta: RequestDelta) -> None:
        self.prompt_tokens[prompt_index] = delta.num_prompt_tokens
        self.cached_tokens[prompt_index] = delta.num_cached_tokens
        for sample in delta.deltas:
            choice = self.choices.setdefault(prompt_index * self.n + sample.index, ChoiceState())
            choice.text += sample.text
            choice.token_ids += sample.token_ids
            choice.logprobs += sample.logprobs or []
            choice.finish_reason = sample.finish_reason or choice.finish_reason
            choice.stop_reason = sample.stop_reason if sample.finish_reason else choice.stop_reason

    def usage(self) -> UsageInfo:
        prompt = sum(self.prompt_tokens.values())
        completion = sum(len(c.token_ids) for c in self.choices.values())
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                         total_tokens=prompt + completion,
                         prompt_tokens_details=PromptTokensDetails(
                             cached_tokens=sum(self.cached_tokens.values())))


class BaseServing:
    """Validation, engine calls, metrics and response plumbing shared by the endpoints."""

    def __init__(self, engine, tokenizer, settings, metrics):
        self.engine = engine
        self.tokenizer = tokenizer
        self.settings = settings
        self.metrics = metrics

    @property
    def model_name(self) -> str:
        return self.settings.served_model_name

    def check_model(self, name: str | None) -> None:
        if name and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist.", param="model",
                           code="model_not_found")

    def tokenize_prompt(self, prompt: str | list[int], add_special_tokens: bool = True,
                        param: str = "prompt") -> list[int]:
        """Token ids of a text or token-id prompt; empty or out-of-vocabulary ids are 400s."""
        if isinstance(prompt, str):
            token_ids = list(self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
        else:
            vocab = self.engine.info.vocab_size
            bad = next((t for t in prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})",
                               param=param)
            token_ids = list(prompt)
        if not token_ids:
            raise APIError(400, "the prompt must not be empty", param=param)
        return token_ids

    def resolve_max_tokens(self, requested: int | None, num_prompt_tokens: int,
                           prompt_param: str, max_param: str = "max_tokens",
                           default: int | None = None) -> int:
        """The completion length to ask for: the prompt plus it must fit in the context."""
        limit = self.engine.info.max_model_len
        room = limit - num_prompt_tokens
        if room <= 0:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. "
                           f"However, your {prompt_param} resulted in {num_prompt_tokens} "
                           "tokens, which leaves no room for a completion.",
                           param=prompt_param, code="context_length_exceeded")
        if requested is None:   # absent: as much as fits (or the endpoint's default)
            return room if default is None else min(default, room)
        if requested > room:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. "
                           f"However, you requested {num_prompt_tokens + requested} tokens "
                           f"({num_prompt_tokens} in the {prompt_param}, {requested} in the "
                           f"completion). Please reduce the length of the {prompt_param} or "
                           f"{max_param}.", param=max_param, code="context_length_exceeded")
        return requested

    async def generate(self, request_id: str, token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestDelta]:
        """The engine's deltas for one prompt, timed for /metrics."""
        timer = self.metrics.start_request()
        outcome: str | None = "abort"
        try:
            async with aclosing(self.engine.generate(request_id, token_ids, params)) as stream:
                async for delta in stream:
                    timer.on_delta(delta)
                    yield delta
            outcome = "done"
        except Exception:
            outcome = None   # rejected or failed: an error, not a latency
            raise
        finally:
            if outcome is not None:
                timer.finish(outcome == "done")

    async def respond(self, http_request: Request, deltas, formatter, n: int, stream: bool,
                      include_usage: bool) -> Response:
        """Run the request and answer as JSON or as SSE; a client that leaves aborts it."""
        accumulator = Accumulator(n)
        try:
            if not stream:
                async def collect() -> None:
                    async with aclosing(deltas):
                        async for prompt_index, delta in deltas:
                            accumulator.add(prompt_index, delta)

                await race_disconnect(http_request, collect())
                return Response(formatter.response(accumulator).model_dump_json(),
                                media_type="application/json")
            # The first delta comes before the 200: a full queue or a bad prompt is a real 4xx/5xx.
            first = await race_disconnect(http_request, anext(deltas, None))
        except BaseException as exc:
            await deltas.aclose()
            if isinstance(exc, ClientDisconnected):
                return Response(status_code=499)   # nobody reads it; nginx's "client closed"
            raise
        body = self._sse_body(first, deltas, formatter, accumulator, include_usage)
        return SSEResponse(body, on_close=deltas.aclose)

    async def _sse_body(self, first, deltas, formatter, accumulator: Accumulator,
                        include_usage: bool) -> AsyncIterator[str]:
        try:
            for chunk in formatter.stream_start():
                yield sse(chunk)
            item = first
            while item is not None:
                accumulator.add(*item)
                for chunk in formatter.stream_chunks(*item):
                    yield sse(chunk)
                item = await anext(deltas, None)
            if include_usage:
                yield sse(formatter.usage_chunk(accumulator.usage()))
        except Exception as exc:   # the 200 is sent: report in-band, as OpenAI does
            yield sse_error(exc, self.settings.retry_after_seconds)
        yield "data: [DONE]\n\n"
