"""Padded step shapes: every jitted step sees one of a small, known set of shapes.

A step is described by four sizes: tokens, sequences, block-table columns (blocks per
sequence) and prefill tiles (query tiles of requests with more than one new token; see
attention/metadata.py). Each is rounded up to a power of two above a floor, so the number of
distinct shapes, and with it the number of XLA compilations, is at most the product of the
per-dimension counts, which `ShapeBuckets.max_shapes` reports.
"""
from __future__ import annotations

from dataclasses import dataclass


def next_power_of_two(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def bucket(n: int, floor: int) -> int:
    """The smallest power of two >= max(n, floor)."""
    return next_power_of_two(max(n, floor))


def powers_between(low: int, high: int) -> list[int]:
    """Powers of two from bucket(low) to bucket(high), both included."""
    values, v = [], bucket(low, 1)
    while v <= bucket(high, 1):
        values.append(v)
        v *= 2
    return values


@dataclass(frozen=True)
class StepShape:
    """The padded sizes of one step; the jitted step is compiled once per distinct value."""
    num_tokens: int
    num_seqs: int
    blocks_per_seq: int
    num_prefill_tiles: int


@dataclass(frozen=True)
class ShapeBuckets:
    """Bucketing rules for an engine's limits.

    max_tokens / max_seqs / max_blocks: the scheduler's max_num_batched_tokens and
    max_num_seqs, and ceil(max_model_len / block_size). prefill_tile: query rows per prefill
    tile of the attention backend. Floors keep tiny steps from each getting their own shape
    (a floor above its maximum's bucket is lowered to it).
    """
    max_tokens: int
    max_seqs: int
    max_blocks: int
    prefill_tile: int
    min_tokens: int = 16
    min_seqs: int = 8
    min_blocks: int = 8

    def shape_for(self, num_tokens: int, num_seqs: int, max_blocks: int,
                  num_prefill_tiles: int) -> StepShape:
        """The padded shape for a step of these real sizes."""
        seqs = bucket(num_seqs, self._floor(self.min_seqs, self.max_seqs))
        return StepShape(num_tokens=bucket(num_tokens, max(self.min_tokens, seqs)),
                         num_seqs=seqs,
                         blocks_per_seq=bucket(max_blocks,
                                               self._floor(self.min_blocks, self.max_blocks)),
                         num_prefill_tiles=0 if num_prefill_tiles == 0
                         else next_power_of_two(num_prefill_tiles))

    @staticmethod
    def _floor(floor: int, maximum: int) -> int:
        return min(floor, bucket(maximum, 1))

    def token_buckets(self) -> list[int]:
        return powers_between(self.min_tokens, max(self.max_tokens, self.min_tokens))

    def seq_buckets(self) -> list[int]:
        return powers_between(self._floor(self.min_seqs, self.max_seqs), self.max_seqs)

    def block_buckets(self) -> list[int]:
        return powers_between(self._floor(self.min_blocks, self.max_blocks), self.max_blocks)

    def prefill_tile_buckets(self) -> list[int]:
        most = self.max_tokens // self.prefill_tile + min(self.max_seqs, self.max_tokens)
        return [0] + powers_between(1, most)

    def decode_shapes(self) -> list[StepShape]:
        """The shapes of steps that only decode (one token per sequence): what a server spends
        most steps in, and what is worth compiling ahead."""
        return [self.shape_for(seqs, seqs, blocks, 0)
                for seqs in self.seq_buckets() for blocks in self.block_buckets()]

    def max_shapes(self) -> int:
        """An upper bound on the distinct step shapes (hence step compilations)."""
        return (len(self.token_buckets()) * len(self.seq_buckets()) * len(self.block_buckets())
                * len(self.prefill_tile_buckets()))
