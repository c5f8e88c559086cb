"""SamplingParams: what a caller may ask of one request's generation, validated on creation."""
from __future__ import annotations

from dataclasses import dataclass, field


class InvalidRequestError(ValueError):
    """A request parameter is invalid. `param` names the offending field (for HTTP 400s)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _check(condition: bool, param: str, message: str) -> None:
    if not condition:
        raise InvalidRequestError(f"{param} {message}", param=param)


@dataclass
class SamplingParams:
    """Per-request sampling controls, with vLLM's names and meanings.

    temperature 0 means greedy. top_k <= 0 (or None) disables top-k. logprobs=k returns the
    sampled token's log-probability plus the k most likely tokens at each position, computed
    from the model's raw distribution (before temperature and truncation).
    """
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Filled by the engine, never by callers: the model's end-of-sequence token ids.
    eos_token_ids: tuple[int, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k is not None and self.top_k <= 0:
            self.top_k = None
        self.validate()

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first invalid field."""
        _check(isinstance(self.n, int) and self.n >= 1, "n", f"must be >= 1, got {self.n}")
        _check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k is None or self.top_k >= 1, "top_k", f"must be >= 1, got {self.top_k}")
        _check(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(self.repetition_penalty > 0, "repetition_penalty",
               f"must be > 0, got {self.repetition_penalty}")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty",
               f"must be in [-2, 2], got {self.presence_penalty}")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty",
               f"must be in [-2, 2], got {self.frequency_penalty}")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
               f"must be >= 1, got {self.max_tokens}")
        _check(self.min_tokens >= 0, "min_tokens", f"must be >= 0, got {self.min_tokens}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        _check(self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs",
               f"must be in [0, 20], got {self.logprobs}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               "must hold non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", "must hold non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def sample_seed(self, index: int) -> int | None:
        """The seed of sample `index` of `n`: distinct per sample, reproducible per request."""
        if self.seed is None:
            return None
        return (self.seed * 1_000_003 + index) % (2**63)
