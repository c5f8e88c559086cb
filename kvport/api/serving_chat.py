"""POST /v1/chat/completions: the tokenizer's chat template, then BaseServing's plumbing."""
from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from kvport.api.errors import APIError
from kvport.api.protocol import (ChatChoice, ChatChoiceLogProbs, ChatCompletionChunk,
                                 ChatCompletionRequest, ChatCompletionResponse, ChatLogProb,
                                 ChatMessage, ChatMessageOut, ChatStreamChoice,
                                 ChatTokenLogProb, DeltaMessage, UsageInfo)
from kvport.api.serving_common import LOGPROB_FLOOR, Accumulator, BaseServing, merge
from kvport.core.request import Logprob, RequestDelta


def render_chat(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True,
                continue_final_message: bool = False,
                template_kwargs: dict | None = None) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template (400 if it fails)."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions",
                       param="messages")
    try:
        text = tokenizer.apply_chat_template(
            [m.template_dict() for m in messages], tokenize=False,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message, **(template_kwargs or {}))
    except APIError:
        raise
    except Exception as exc:   # jinja's raise_exception, bad roles, bad template kwargs
        raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from None
    # The template writes the special tokens (BOS included) itself.
    return list(tokenizer.encode(text, add_special_tokens=False))


def _logprob(entry: Logprob) -> ChatLogProb:
    token = entry.decoded_token or ""
    return ChatLogProb(token=token, logprob=max(entry.logprob, LOGPROB_FLOOR),
                       bytes=list(token.encode("utf-8")))


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]],
                  top: int) -> ChatChoiceLogProbs:
    """Per token: the sampled one, and the `top` most likely (by rank) as top_logprobs."""
    content = []
    for token_id, entry in zip(token_ids, entries):
        sampled = _logprob(entry[token_id])
        ranked = sorted(entry.values(), key=lambda lp: lp.rank)[:top]
        content.append(ChatTokenLogProb(**sampled.model_dump(),
                                        top_logprobs=[_logprob(lp) for lp in ranked]))
    return ChatChoiceLogProbs(content=content)


class ChatFormatter:
    """Builds chat.completion chunks and responses from engine deltas."""

    def __init__(self, request_id: str, model: str, n: int, top_logprobs: int | None):
        self.request_id, self.model, self.n = request_id, model, n
        self.top_logprobs = top_logprobs   # None: no logprobs asked for
        self.created = int(time.time())

    def stream_start(self) -> list[BaseModel]:
        """OpenAI opens each choice with a role-only delta."""
        return [self._chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant",
                                                                          content=""))])
                for i in range(self.n)]

    def stream_chunks(self, prompt_index: int, delta: RequestDelta) -> list[BaseModel]:
        return [self._chunk([ChatStreamChoice(
            index=sample.index, delta=DeltaMessage(content=sample.text),
            logprobs=self._logprobs(sample.token_ids, sample.logprobs),
            finish_reason=sample.finish_reason, stop_reason=sample.stop_reason)])
            for sample in delta.deltas]

    def usage_chunk(self, usage: UsageInfo) -> BaseModel:
        return self._chunk([], usage)

    def response(self, accumulator: Accumulator) -> BaseModel:
        choices = [ChatChoice(index=index, message=ChatMessageOut(content=state.text),
                              logprobs=self._logprobs(state.token_ids, state.logprobs),
                              finish_reason=state.finish_reason, stop_reason=state.stop_reason)
                   for index, state in sorted(accumulator.choices.items())]
        return ChatCompletionResponse(id=self.request_id, created=self.created, model=self.model,
                                      choices=choices, usage=accumulator.usage())

    def _logprobs(self, token_ids, entries) -> ChatChoiceLogProbs | None:
        if self.top_logprobs is None:
            return None
        return chat_logprobs(token_ids, entries or [], self.top_logprobs)

    def _chunk(self, choices: list[ChatStreamChoice], usage: UsageInfo | None = None):
        return ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model,
                                   choices=choices, usage=usage)


class ChatServing(BaseServing):
    """POST /v1/chat/completions."""

    async def create(self, request: ChatCompletionRequest, http_request: Request) -> Response:
        self.check_model(request.model)
        request.check_supported()
        token_ids = render_chat(self.tokenizer, request.messages,
                                request.add_generation_prompt is not False,
                                bool(request.continue_final_message),
                                request.chat_template_kwargs)
        requested, max_param = request.max_tokens_param
        max_tokens = self.resolve_max_tokens(requested, len(token_ids), "messages", max_param)
        top = (request.top_logprobs or 0) if request.logprobs else None
        params = request.sampling_params(max_tokens, top)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        n = request.n or 1
        formatter = ChatFormatter(request_id, self.model_name, n, top)
        deltas = merge([self.generate(request_id, token_ids, params)])
        return await self.respond(http_request, deltas, formatter, n, bool(request.stream),
                                  request.include_usage)
