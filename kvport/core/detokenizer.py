"""Incremental detokenization and stop-string handling for one sample of a request.

The tokenizer (a transformers tokenizer, or anything with the same `decode` method) is passed
in; this module imports neither torch nor jax.

Decoding uses the classic prefix_offset/read_offset window: to turn the tokens after
`read_offset` into text, decode `ids[prefix_offset:]` and `ids[prefix_offset:read_offset]`
and emit the difference. Decoding a few tokens of context keeps the tokenizer's
context-dependent behaviour (e.g. SentencePiece's leading space) right, and work per token is
proportional to the window, not the whole output. When the window's text ends with the
replacement character U+FFFD, a multi-byte character is split across tokens: nothing is
emitted until a later token completes it.
"""
from __future__ import annotations

from typing import Any, Sequence

from kvport.core.sampling_params import SamplingParams

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded as context before the first output token.
INITIAL_PROMPT_CONTEXT = 6
# Drop consumed token ids from the window's list once this many precede the window.
_COMPACT_AFTER = 1024


class IncrementalDetokenizer:
    """Turns one sample's output tokens into text, token by token, and applies stop strings.

    `output_text` is the text so far (truncated at a stop string once one matched);
    `update` feeds new tokens and returns the matched stop string, if any; `get_delta` hands
    out the text not yet streamed, withholding a possible stop-string prefix.

    Without stop strings nothing needs the text until someone reads it, so `update` only
    queues the ids and decoding happens when `output_text` or `get_delta` is read: once per
    streamed chunk, or once per request for a caller that reads only the final output
    (offline generation), instead of twice per token.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int],
                 sampling_params: SamplingParams):
        self.tokenizer = tokenizer
        self.stop: list[str] = list(sampling_params.stop or [])
        self.include_stop_str_in_output = sampling_params.include_stop_str_in_output
        self.skip_special_tokens = sampling_params.skip_special_tokens
        self.max_stop_len = max((len(s) for s in self.stop), default=0)

        self._text = ""
        # The matched stop string once one was found; later tokens are then ignored.
        self.stop_reason: str | None = None
        self._finished = False
        self._sent_offset = 0  # chars of output_text already handed out by get_delta
        self._token_text_cache: dict[int, str] = {}

        # Decode window over prompt tail + output ids: the text of ids[prefix:read] was
        # already emitted (or belongs to the prompt); ids[read:] are still pending.
        self._ids: list[int] = list(prompt_token_ids[-INITIAL_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    @property
    def output_text(self) -> str:
        """The text so far: pending ids are decoded first (a split character stays pending
        until it completes or the sample finishes)."""
        if self._read_offset < len(self._ids) and self.stop_reason is None:
            self._text += self._decode_pending(force=self._finished)
        return self._text

    # ------------------------------------------------------------------ decoding

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _decode_pending(self, force: bool = False) -> str:
        """Text of the pending tokens; "" while it would end in a split character (unless
        `force`). Advances the window when text is emitted."""
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if not force and new_text.endswith(REPLACEMENT_CHAR):
            return ""  # a multi-byte character is split across tokens: wait for the rest
        if len(new_text) < len(prefix_text):
            # Should not happen with sane tokenizers; never emit text twice.
            delta = ""
        else:
            delta = new_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if self._prefix_offset > _COMPACT_AFTER:
            del self._ids[:self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return delta

    # ------------------------------------------------------------------ stop strings

    def _check_stop(self, old_len: int) -> str | None:
        """Search the text reachable since `old_len` for the earliest stop string; truncate."""
        if not self.stop or len(self._text) == old_len:
            return None
        start = max(0, old_len - self.max_stop_len + 1)
        best_idx = -1
        best_stop: str | None = None
        for s in self.stop:
            idx = self._text.find(s, start)
            if idx != -1 and (best_idx == -1 or idx < best_idx):
                best_idx, best_stop = idx, s
        if best_stop is None:
            return None
        end = best_idx + len(best_stop) if self.include_stop_str_in_output else best_idx
        self._text = self._text[:end]
        self.stop_reason = best_stop
        return best_stop

    # ------------------------------------------------------------------ public API

    def update(self, new_token_ids: Sequence[int]) -> str | None:
        """Append tokens, extend `output_text`, and return the stop string that matched (the
        text is then truncated at it), else None. Ignored once stopped or finished."""
        if self.stop_reason is not None or self._finished:
            return None
        if not self.stop:          # nothing to check: decode when the text is read
            self._ids.extend(int(t) for t in new_token_ids)
            return None
        old_len = len(self._text)
        pieces = []
        for token_id in new_token_ids:
            self._ids.append(int(token_id))
            piece = self._decode_pending()
            if piece:
                pieces.append(piece)
        if pieces:
            self._text += "".join(pieces)
        return self._check_stop(old_len)

    def finish(self) -> str | None:
        """Mark the sample finished: flush tokens still held back as a split character (as
        `tokenizer.decode` would render them) unless a stop string already ended the text.
        Returns a stop string if the flushed text completed one. Idempotent."""
        if self._finished:
            return None
        self._finished = True
        if self.stop_reason is not None:
            return None
        old_len = len(self._text)
        self._text += self._decode_pending(force=True)
        return self._check_stop(old_len)

    def get_delta(self, finished: bool) -> str:
        """Text not yet handed out. While not finished, the last (max_stop_len - 1) chars are
        withheld (they may begin a stop string) unless include_stop_str_in_output."""
        if finished:
            self.finish()
            end = len(self.output_text)
        elif self.stop and not self.include_stop_str_in_output and self.stop_reason is None:
            end = len(self.output_text) - (self.max_stop_len - 1)
        else:
            end = len(self.output_text)
        if end <= self._sent_offset:
            return ""
        delta = self.output_text[self._sent_offset:end]
        self._sent_offset = end
        return delta

    def decode_token(self, token_id: int) -> str:
        """The text of a single token (special tokens included), e.g. for logprobs."""
        text = self._token_text_cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([int(token_id)], skip_special_tokens=False,
                                         clean_up_tokenization_spaces=False) or ""
            if len(self._token_text_cache) < 65536:
                self._token_text_cache[token_id] = text
        return text
