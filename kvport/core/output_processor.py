"""Turn sampled tokens into text, logprobs and RequestOutputs; apply stop strings.

One `RequestGroup` per user request gathers its n samples. Text is detokenized incrementally
and stop strings end a sample here (the scheduler handles EOS, stop tokens and lengths).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kvport.core.detokenizer import IncrementalDetokenizer
from kvport.core.request import (CompletionDelta, CompletionOutput, Logprob, Request,
                                 RequestDelta, RequestOutput, SampleLogprobs)
from kvport.core.worker import SampledLogprobs


@dataclass
class SampleState:
    """One sample's text and logprobs so far."""
    request: Request
    detokenizer: IncrementalDetokenizer
    logprobs: SampleLogprobs | None = None
    cumulative_logprob: float | None = None
    num_sent_tokens: int = 0
    finish_sent: bool = False

    def take_delta(self, index: int) -> CompletionDelta | None:
        """Tokens, text and logprobs not handed out yet; None when there is nothing new."""
        request = self.request
        finished = request.is_finished
        new_tokens = request.output_token_ids[self.num_sent_tokens:]
        if not new_tokens and (self.finish_sent or not finished):
            return None
        logprobs = None if self.logprobs is None else self.logprobs[self.num_sent_tokens:]
        self.num_sent_tokens = len(request.output_token_ids)
        self.finish_sent = finished
        return CompletionDelta(index=index, text=self.detokenizer.get_delta(finished),
                               token_ids=list(new_tokens), logprobs=logprobs,
                               cumulative_logprob=self.cumulative_logprob,
                               finish_reason=request.finish_reason,
                               stop_reason=request.stop_reason)


@dataclass
class RequestGroup:
    """A user request: its prompt and its samples."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[SampleState] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.request.is_finished for s in self.samples)

    def take_delta(self) -> RequestDelta:
        deltas = [d for i, s in enumerate(self.samples) if (d := s.take_delta(i)) is not None]
        return RequestDelta(self.request_id, deltas, finished=self.finished,
                            num_prompt_tokens=len(self.prompt_token_ids),
                            num_cached_tokens=max(0, self.samples[0].request.num_cached_tokens))

    def to_output(self) -> RequestOutput:
        outputs = [CompletionOutput(
            index=i, text=s.detokenizer.output_text, token_ids=list(s.request.output_token_ids),
            cumulative_logprob=s.cumulative_logprob, logprobs=s.logprobs,
            finish_reason=s.request.finish_reason, stop_reason=s.request.stop_reason)
            for i, s in enumerate(self.samples)]
        cached = max(0, self.samples[0].request.num_cached_tokens)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs,
                             finished=self.finished, num_cached_tokens=cached)


def new_sample_state(request: Request, tokenizer) -> SampleState:
    wants_logprobs = request.sampling_params.logprobs is not None
    return SampleState(request, IncrementalDetokenizer(tokenizer, request.prompt_token_ids,
                                                       request.sampling_params),
                       logprobs=[] if wants_logprobs else None,
                       cumulative_logprob=0.0 if wants_logprobs else None)


def logprob_entry(logprobs: SampledLogprobs, row: int, num_top: int,
                  detokenizer: IncrementalDetokenizer) -> dict[int, Logprob]:
    """The sampled token's Logprob followed by the top `num_top` (vLLM's dict shape)."""
    ids, values, ranks = logprobs.token_ids[row], logprobs.logprobs[row], logprobs.ranks[row]
    entry: dict[int, Logprob] = {}
    for col in range(min(1 + num_top, ids.shape[0])):
        token_id = int(ids[col])
        if token_id not in entry:
            entry[token_id] = Logprob(float(values[col]), int(ranks[col]),
                                      detokenizer.decode_token(token_id))
    return entry


def apply_token(sample: SampleState, token_id: int, logprobs: SampledLogprobs | None,
                row: int | None) -> str | None:
    """Record one new token of a sample. Returns a stop string if one was hit."""
    if sample.logprobs is not None and logprobs is not None and row is not None:
        entry = logprob_entry(logprobs, row, sample.request.sampling_params.logprobs or 0,
                              sample.detokenizer)
        sample.logprobs.append(entry)
        sample.cumulative_logprob += entry[token_id].logprob
    return sample.detokenizer.update([token_id])


def row_index(req_ids: list[str]) -> dict[str, int]:
    return {req_id: i for i, req_id in enumerate(req_ids)}

