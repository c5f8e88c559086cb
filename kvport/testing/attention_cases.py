"""The attention grid: cases, and what each one checks against the torch reference.

A case is a batch of requests, each (context tokens, new tokens), with shapes (head size, GQA
ratio, block size, dtype, sliding window) and optionally blocks shared between requests
(prefix caching). It runs as three steps through the backend under test and through
`TorchReferenceBackend` (on the CPU, its own cache), on two layers with one metadata:

1. context: every request's context written through the backend's own forward (so any KV
   cache layout works), read back by its queries;
2. test: the new tokens: decodes and prefill chunks mixed, in shuffled batch order;
3. read-back: one more decode token per request, which reads everything written before.

Block tables are shuffled and non-contiguous, caches start full of random stale values and
inputs are fresh random numbers each run, so reading a wrong slot, skipping a write or
ignoring the mask shows up as a wrong number, which the report pins to a token, request and
head.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# (atol, rtol) by dtype. float32 allows TF32 matmuls; bf16/fp16 allow input and probability
# rounding. A wrong slot, mask or scale is off by 0.1 or more.
TOLERANCE = {"float32": (1e-3, 1e-3), "bfloat16": (2e-2, 2e-2), "float16": (4e-3, 4e-3)}
NUM_LAYERS = 2


@dataclass(frozen=True)
class AttentionCase:
    """One batch. shared: (request, source request, number of leading blocks it shares)."""
    kind: str
    requests: tuple[tuple[int, int], ...]
    head_size: int
    group: int
    block_size: int
    dtype: str
    num_kv_heads: int = 2
    sliding_window: int | None = None
    shared: tuple[tuple[int, int, int], ...] = ()

    @property
    def num_heads(self) -> int:
        return self.num_kv_heads * self.group

    @property
    def id(self) -> str:
        window = f"-window{self.sliding_window}" if self.sliding_window else ""
        return (f"{self.kind}-h{self.head_size}-gqa{self.group}-bs{self.block_size}"
                f"-{self.dtype}{window}")

    def describe(self) -> str:
        window = (f"sliding_window={self.sliding_window}" if self.sliding_window
                  else "no sliding window")
        shared = "".join(f"; request {r} shares the first {n} blocks of request {s}"
                         for r, s, n in self.shared)
        return (f"{self.kind}: head_size={self.head_size}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads} (GQA {self.group}), "
                f"block_size={self.block_size}, dtype={self.dtype}, {window}; "
                f"requests as (context, new tokens): {list(self.requests)}{shared}")

    def spec(self):
        from kvport.attention_backends.interface import AttentionSpec
        return AttentionSpec(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                             head_size=self.head_size, block_size=self.block_size,
                             dtype=self.dtype, scale=self.head_size ** -0.5,
                             sliding_window=self.sliding_window)


# ------------------------------------------------------------------ the grid

def mixed_requests(bs: int) -> tuple[tuple[int, int], ...]:
    """Decodes (first token, at and around block edges, long) and prefill chunks with and
    without context, aligned and not."""
    return ((0, 1), (bs - 1, 1), (bs, 1), (3 * bs + 5, 1), (70, 1), (0, 7), (0, 2 * bs + 3),
            (bs, 5), (13, 2 * bs + 1), (5 * bs + 3, bs))


def window_requests(window: int, bs: int) -> tuple[tuple[int, int], ...]:
    return ((0, 1), (3, 1), (window, 1), (window + 2 * bs + 3, 1), (0, window + 9), (7, 30),
            (window + 11, 4))


def prefix_case(head_size: int, group: int, bs: int, dtype: str) -> AttentionCase:
    """Requests 1 and 2 reuse request 0's cached leading blocks (written in the context
    step); request 4 reuses blocks request 3 writes in this very step."""
    requests = ((3 * bs, 2), (2 * bs + 3, 1), (2 * bs, bs + 2), (0, 2 * bs + 5), (bs, 3))
    shared = ((1, 0, 2), (2, 0, 2), (4, 3, 1))
    return AttentionCase("prefix_cached", requests, head_size, group, bs, dtype, shared=shared)


def attention_grid(dtypes: tuple[str, ...], full: bool) -> list[AttentionCase]:
    """The default grid is small (CI time); `full` sweeps every dimension."""
    head_sizes = (64, 80, 96, 128, 256) if full else (64, 128)
    groups = (1, 2, 4, 8) if full else (1, 4)
    block_sizes = (8, 16, 32) if full else (16,)
    windows = (1, 5, 16, 40) if full else (5, 40)
    cases = [AttentionCase("mixed", mixed_requests(bs), h, g, bs, dtype)
             for dtype in dtypes for bs in block_sizes for h in head_sizes for g in groups]
    if not full:
        cases.append(AttentionCase("mixed", mixed_requests(32), 64, 2, 32, dtypes[0]))
        cases.append(AttentionCase("decode_only", tuple((c, 1) for c in (1, 17, 40, 63, 200)),
                                   64, 4, 16, dtypes[0]))
    cases += [AttentionCase("sliding_window", window_requests(w, bs), 64, 2, bs, dtype,
                            sliding_window=w)
              for dtype in (dtypes if full else dtypes[:1]) for bs in block_sizes for w in windows]
    cases += [prefix_case(64, 4, bs, dtype) for dtype in (dtypes if full else dtypes[:1])
              for bs in ((4,) + block_sizes if full else (4, 16))]
    return cases


def fit_case(case: AttentionCase, backend_class) -> AttentionCase | None:
    """`case` with the backend's own block size when it supports none of the grid's; None
    when its shape is unsupported (the caller skips with the backend's reason)."""
    sizes = getattr(backend_class, "supported_block_sizes", None)
    if sizes and case.block_size not in sizes:
        bs = sizes[0]
        if case.kind == "prefix_cached":
            return prefix_case(case.head_size, case.group, bs, case.dtype)
        requests = (window_requests(case.sliding_window, bs) if case.sliding_window
                    else mixed_requests(bs) if case.kind == "mixed" else case.requests)
        return AttentionCase(case.kind, requests, case.head_size, case.group, bs, case.dtype,
                             case.num_kv_heads, case.sliding_window, case.shared)
    return case


# ------------------------------------------------------------------ building the steps

@dataclass
class Step:
    """One step's plain metadata plus which request each row is and where its tokens start."""
    label: str
    common: object                   # CommonAttentionMetadata
    rows: list[int]                  # request index of each batch row
    starts: list[int]                # tokens each row's request had before this step


def block_tables(case: AttentionCase, rng: np.random.Generator) -> tuple[list[list[int]], int]:
    """Shuffled physical blocks per request (shared ones included) and the pool size."""
    bs = case.block_size
    needed = [-(-(c + q + 1) // bs) for c, q in case.requests]   # +1: the read-back token
    shared = {r: (s, n) for r, s, n in case.shared}
    own = [needed[i] - shared[i][1] if i in shared else needed[i] for i in range(len(needed))]
    num_blocks = sum(own) + 5
    free = [int(b) for b in rng.permutation(num_blocks)]
    tables = [[free.pop() for _ in range(n)] for n in own]
    for r, (s, n) in shared.items():
        tables[r] = tables[s][:n] + tables[r]
    return tables, num_blocks


def make_step(label: str, chunks: list[tuple[int, int, int]], tables: list[list[int]],
              block_size: int, order: np.ndarray) -> Step:
    """chunks: (request, first position, count) per request that runs in this step."""
    from kvport.attention_backends.interface import CommonAttentionMetadata

    chunks = [chunks[i] for i in order if chunks[i][2] > 0] if len(order) else chunks
    max_blocks = max(len(t) for t in tables) + 2      # trailing zeros, as the runner pads
    table = np.zeros((len(chunks), max_blocks), dtype=np.int32)
    qsl = np.zeros(len(chunks) + 1, dtype=np.int32)
    seq_lens = np.zeros(len(chunks), dtype=np.int32)
    slots = []
    for row, (req, start, count) in enumerate(chunks):
        table[row, :len(tables[req])] = tables[req]
        qsl[row + 1] = qsl[row] + count
        seq_lens[row] = start + count
        pos = np.arange(start, start + count)
        slots.append(table[row, pos // block_size].astype(np.int64) * block_size
                     + pos % block_size)
    common = CommonAttentionMetadata(query_start_loc=qsl, seq_lens=seq_lens, block_table=table,
                                     slot_mapping=np.concatenate(slots))
    return Step(label, common, [c[0] for c in chunks], [c[1] for c in chunks])


def case_steps(case: AttentionCase, tables: list[list[int]],
               rng: np.random.Generator) -> list[Step]:
    """The context, test and read-back steps of `case` (requests shuffled in each)."""
    shared_tokens = {r: n * case.block_size for r, _, n in case.shared}
    n = len(case.requests)
    context = [(i, shared_tokens.get(i, 0), c - shared_tokens.get(i, 0))
               for i, (c, _) in enumerate(case.requests)]
    test = [(i, c, q) for i, (c, q) in enumerate(case.requests)]
    readback = [(i, c + q, 1) for i, (c, q) in enumerate(case.requests)]
    steps = []
    for label, chunks in (("context step (each request's context written through the backend)",
                           context),
                          ("test step (the new tokens: decodes and prefill chunks mixed)", test),
                          ("read-back step (one decode per request, reading all it wrote)",
                           readback)):
        if any(count > 0 for _, _, count in chunks):
            steps.append(make_step(label, chunks, tables, case.block_size, rng.permutation(n)))
    return steps
