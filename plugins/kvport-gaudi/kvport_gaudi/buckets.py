"""Bucketed static shapes: every size a step's graph depends on is rounded up to a bucket.

Gaudi's graph compiler builds one graph per distinct set of input shapes, and HPU graphs
replay one recording per shape; a step whose sizes were all different would compile anew.
Each size is rounded up by a `BucketRule`: powers of two from `minimum` up to `step`, then
multiples of `step` (the ramp keeps small batches cheap, the linear part keeps padding of
large ones under one step). Padding is always masked, so a bucket never changes a result
(tests/test_gaudi_attention.py checks it against exact shapes).
"""
from __future__ import annotations

from dataclasses import dataclass, field


def next_power_of_two(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


@dataclass(frozen=True)
class BucketRule:
    """Round a size up: `minimum`, then powers of two up to `step`, then multiples of `step`."""
    minimum: int = 1
    step: int = 32

    def __post_init__(self) -> None:
        if self.minimum < 1 or self.step < 1:
            raise ValueError(f"bucket minimum and step must be >= 1, got {self}")

    def __call__(self, n: int) -> int:
        if n <= self.minimum:
            return self.minimum
        if n <= self.step:
            return max(next_power_of_two(n), self.minimum)
        return -(-n // self.step) * self.step


EXACT = BucketRule(minimum=1, step=1)       # no padding: every size is its own bucket


@dataclass(frozen=True)
class GaudiBuckets:
    """The bucket rule of each padded size of a step.

    tokens: the step's token count (the model's input length; padded only when the worker
        enables token padding, see GaudiPagedBackend.enable_token_padding).
    decode_seqs / decode_blocks: requests with one new token, and the entries of the flat
        block list they read.
    prefill_seqs / prefill_query / prefill_blocks: requests with several new tokens, their
        longest chunk, and their most context blocks.
    """
    tokens: BucketRule = field(default_factory=lambda: BucketRule(minimum=32, step=256))
    decode_seqs: BucketRule = field(default_factory=lambda: BucketRule(minimum=4, step=64))
    decode_blocks: BucketRule = field(default_factory=lambda: BucketRule(minimum=32, step=256))
    prefill_seqs: BucketRule = field(default_factory=lambda: BucketRule(minimum=1, step=8))
    prefill_query: BucketRule = field(default_factory=lambda: BucketRule(minimum=16, step=256))
    prefill_blocks: BucketRule = field(default_factory=lambda: BucketRule(minimum=4, step=32))

    @classmethod
    def exact(cls) -> "GaudiBuckets":
        """No padding anywhere (what bucketing is checked against)."""
        return cls(EXACT, EXACT, EXACT, EXACT, EXACT, EXACT)
