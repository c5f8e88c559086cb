"""Static shape buckets: the Neuron compiler builds one graph per distinct set of shapes, so
every size a step's graph depends on is rounded up to a power of two above a floor, and the
number of graphs is bounded by the product of the per-size bucket counts.

The sizes and their padding rules:

* tokens (the model's input length; padded only when the worker asks, see
  NeuronPagedBackend.enable_token_padding): padding tokens have input id 0 and position 0,
  write their keys/values into a spare block the worker keeps out of the cache manager's
  hands, belong to no request and return zeros.
* sequences (per batch: the decodes, the prefill chunks): padding sequences own no token;
  their rows read token 0's query, attend to one active slot only, and are never written
  back.
* query rows per sequence (prefill batch; the decode batch has one): rows past a chunk's
  length are padding rows, handled like the rows of padding sequences.
* blocks per sequence (the prior context's blocks, block_size keys each): padding entries
  repeat the sequence's last block (a block the step reads anyway) and are masked.

Masked scores take the finite value MASKED (not -inf), so a row with no visible prior key
still has a finite maximum; the merge with the active part gives it weight exp(MASKED - m) = 0.
"""
from __future__ import annotations

from dataclasses import dataclass

MASKED = -1.0e30


def bucket(n: int, floor: int) -> int:
    """The smallest power of two >= max(n, floor)."""
    return 1 << (max(int(n), int(floor), 1) - 1).bit_length()


@dataclass(frozen=True)
class NeuronBuckets:
    """Floors of the four bucketed sizes; floor 1 everywhere is exact powers of two, and
    `exact()` turns bucketing off (what it is checked against)."""
    min_tokens: int = 32
    min_seqs: int = 4
    min_query: int = 16
    min_blocks: int = 8
    enabled: bool = True

    def tokens(self, n: int) -> int:
        return bucket(n, self.min_tokens) if self.enabled else n

    def seqs(self, n: int) -> int:
        return bucket(n, self.min_seqs) if self.enabled else n

    def query(self, n: int) -> int:
        return bucket(n, self.min_query) if self.enabled and n > 1 else n

    def blocks(self, n: int) -> int:
        return bucket(n, self.min_blocks) if self.enabled else max(n, 1)

    @classmethod
    def exact(cls) -> "NeuronBuckets":
        return cls(enabled=False)
