"""POST /v1/completions, on top of the shared plumbing in serving_common."""
from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from kvport.api.errors import APIError
from kvport.api.protocol import (CompletionChoice, CompletionLogProbs, CompletionRequest,
                                 CompletionResponse, UsageInfo)
from kvport.api.serving_common import LOGPROB_FLOOR, Accumulator, BaseServing, merge
from kvport.core.request import Logprob, RequestDelta


# ------------------------------------------------------------------------ completions
def completion_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]],
                        offset: int) -> tuple[CompletionLogProbs, int]:
    """The legacy logprobs shape; top_logprobs holds the sampled token plus the top k."""
    result = CompletionLogProbs()
    for token_id, entry in zip(token_ids, entries):
        token = entry[token_id].decoded_token or ""
        result.tokens.append(token)
        result.token_logprobs.append(max(entry[token_id].logprob, LOGPROB_FLOOR))
        result.top_logprobs.append({(lp.decoded_token or ""): max(lp.logprob, LOGPROB_FLOOR)
                                    for lp in sorted(entry.values(), key=lambda x: x.rank)})
        result.text_offset.append(offset)
        offset += len(token)
    return result, offset


class CompletionFormatter:
    """Builds /v1/completions chunks and responses from engine deltas."""

    def __init__(self, request_id: str, model: str, n: int, echo_texts: list[str] | None,
                 wants_logprobs: bool):
        self.request_id, self.model, self.n = request_id, model, n
        self.echo_texts = echo_texts
        self.wants_logprobs = wants_logprobs
        self.created = int(time.time())
        self.offsets: dict[int, int] = {}   # per choice: text offset of its next token

    def _echo(self, index: int) -> str:
        return self.echo_texts[index // self.n] if self.echo_texts else ""

    def stream_start(self) -> list[BaseModel]:
        return []

    def stream_chunks(self, prompt_index: int, delta: RequestDelta) -> list[BaseModel]:
        chunks = []
        for sample in delta.deltas:
            index = prompt_index * self.n + sample.index
            first = index not in self.offsets
            text = (self._echo(index) if first else "") + sample.text
            logprobs = None
            if self.wants_logprobs:
                logprobs, self.offsets[index] = completion_logprobs(
                    sample.token_ids, sample.logprobs or [], self.offsets.get(index, 0))
            else:
                self.offsets[index] = 0
            chunks.append(self._wrap([CompletionChoice(
                index=index, text=text, logprobs=logprobs, finish_reason=sample.finish_reason,
                stop_reason=sample.stop_reason)]))
        return chunks

    def usage_chunk(self, usage: UsageInfo) -> BaseModel:
        return self._wrap([], usage)

    def response(self, accumulator: Accumulator) -> BaseModel:
        choices = []
        for index in sorted(accumulator.choices):
            state, echo = accumulator.choices[index], self._echo(index)
            logprobs = completion_logprobs(state.token_ids, state.logprobs, len(echo))[0] \
                if self.wants_logprobs else None
            choices.append(CompletionChoice(index=index, text=echo + state.text,
                                            logprobs=logprobs, finish_reason=state.finish_reason,
                                            stop_reason=state.stop_reason))
        return self._wrap(choices, accumulator.usage())

    def _wrap(self, choices: list[CompletionChoice], usage: UsageInfo | None = None):
        return CompletionResponse(id=self.request_id, created=self.created, model=self.model,
                                  choices=choices, usage=usage)


class CompletionServing(BaseServing):
    """POST /v1/completions: text or token-id prompts, one or a batch, n choices each."""

    async def create(self, request: CompletionRequest, http_request: Request) -> Response:
        self.check_model(request.model)
        request.check_supported()
        prompts = request.prompt_list()
        if not prompts:
            raise APIError(400, "the prompt must not be empty", param="prompt")
        token_lists = [self.tokenize_prompt(p, request.add_special_tokens is not False)
                       for p in prompts]
        # OpenAI's default of 16 applies only when the client did not say; null means "all".
        explicit = "max_tokens" in request.model_fields_set
        params = [request.sampling_params(
            self.resolve_max_tokens(request.max_tokens if explicit else None, len(ids),
                                    "prompt", default=None if explicit else 16),
            request.logprobs) for ids in token_lists]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}"
                                                      for i in range(len(prompts))]
        streams = [self.generate(rid, toks, p) for rid, toks, p in zip(ids, token_lists, params)]
        echo = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in prompts] \
            if request.echo else None
        n = request.n or 1
        formatter = CompletionFormatter(request_id, self.model_name, n, echo,
                                        request.logprobs is not None)
        return await self.respond(http_request, merge(streams), formatter, n,
                                  bool(request.stream), request.include_usage)
