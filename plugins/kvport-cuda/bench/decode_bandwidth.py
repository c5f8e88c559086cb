"""Decode attention bandwidth of the triton_paged kernel against this GPU's copy bandwidth,
both measured in the same run (issue 4's bar: >= 80% of the copy bandwidth at batch 64,
context 4096, head size 128, GQA 4, bf16).

Bytes counted: every key and value of every context read once, plus the queries read and
the outputs written. The copy bandwidth is a 2 GiB device-to-device copy, counting bytes
read plus bytes written (as tools/peers_gpu.py measures it). Times are medians of CUDA-event
timings (triton.testing.do_bench), after warm-up. `--sweep` also times other tile sizes,
warp counts, pipeline depths and split counts, so the defaults can be checked.

    python plugins/kvport-cuda/bench/decode_bandwidth.py --sweep --json out.json
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json

import numpy as np
import torch
import triton.testing

from kvport.attention_backends.interface import AttentionSpec
from kvport.attention_backends.triton_paged import (TritonLaunchConfig,
                                                    TritonPagedAttentionBackend)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def copy_bandwidth(size: int = 2 * 2**30) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    x = torch.empty(size, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=400, return_mode="median")
    del x, y
    torch.cuda.empty_cache()
    return 2 * size / (ms * 1e-3)


def make_case(args):
    spec = AttentionSpec(num_heads=args.heads, num_kv_heads=args.kv_heads,
                         head_size=args.head_size, block_size=args.block_size,
                         dtype=args.dtype, scale=args.head_size ** -0.5)
    dtype = DTYPES[args.dtype]
    blocks_per_seq = -(-2 * args.context // args.block_size)
    num_blocks = args.batch * blocks_per_seq + 1
    gen = torch.Generator(device="cuda").manual_seed(0)
    cache = torch.randn(2, num_blocks, args.block_size, args.kv_heads, args.head_size,
                        device="cuda", generator=gen).to(dtype)
    table = (1 + torch.randperm(num_blocks - 1, device="cuda", generator=gen)
             [: args.batch * blocks_per_seq]).view(args.batch, blocks_per_seq).int()
    query = torch.randn(args.batch, args.heads, args.head_size, device="cuda",
                        generator=gen).to(dtype)
    # contexts uniform in context x [1 - spread, 1 + spread] (W1's decode batches are ragged)
    low = max(1, round(args.context * (1 - args.spread)))
    seq_lens = torch.randint(low, args.context + (args.context - low) + 1, (args.batch,),
                             device="cuda", generator=gen, dtype=torch.int32)
    if args.spread == 0:
        seq_lens.fill_(args.context)
    seq_lens.clamp_(max=blocks_per_seq * args.block_size)
    slots = torch.full((args.batch,), -1, dtype=torch.int32, device="cuda")
    itemsize = torch.empty(0, dtype=dtype).element_size()
    kv_bytes = 2 * int(seq_lens.sum()) * args.kv_heads * args.head_size * itemsize
    io_bytes = 2 * args.batch * args.heads * args.head_size * itemsize
    return spec, cache, table, query, seq_lens, slots, kv_bytes + io_bytes


def time_decode(spec, launch, splits, cache, table, query, seq_lens,
                slots) -> tuple[float, int]:
    """(median milliseconds of one decode attention, both kernels when split; splits used)."""
    backend_class = type("Tuned", (TritonPagedAttentionBackend,), {"launch": launch})
    backend = backend_class(spec)
    if splits is None:
        splits = backend.num_splits(query.shape[0], int(seq_lens.max()), query.device)
    metadata = backend.decode_metadata(slots, seq_lens, table, splits)
    out = torch.empty(query.shape[0], spec.num_heads * spec.head_size, dtype=query.dtype,
                      device="cuda")
    return triton.testing.do_bench(lambda: backend.decode(query, cache, metadata, out),
                                   warmup=50, rep=300, return_mode="median"), splits


def prefill_rate(args, num_reqs: int = 8, length: int = 1024) -> dict:
    """Causal prefill of `num_reqs` fresh prompts of `length` tokens (W1's largest) through
    the unified kernel: achieved attention TFLOP/s (2 matmuls over the causal half)."""
    from kvport.attention_backends.interface import CommonAttentionMetadata

    spec = AttentionSpec(num_heads=args.heads, num_kv_heads=args.kv_heads,
                         head_size=args.head_size, block_size=args.block_size,
                         dtype=args.dtype, scale=args.head_size ** -0.5)
    backend = TritonPagedAttentionBackend(spec)
    dtype = DTYPES[args.dtype]
    blocks = -(-length // args.block_size)
    table = (1 + np.arange(num_reqs * blocks, dtype=np.int32)).reshape(num_reqs, blocks)
    pos = np.arange(length)
    common = CommonAttentionMetadata(
        query_start_loc=(np.arange(num_reqs + 1) * length).astype(np.int32),
        seq_lens=np.full(num_reqs, length, dtype=np.int32), block_table=table,
        slot_mapping=(table[:, pos // args.block_size] * args.block_size
                      + pos % args.block_size).reshape(-1).astype(np.int64))
    metadata = backend.build_metadata(common, "cuda")
    cache = torch.randn(2, num_reqs * blocks + 1, args.block_size, args.kv_heads,
                        args.head_size, device="cuda").to(dtype)
    query = torch.randn(num_reqs * length, args.heads, args.head_size, device="cuda").to(dtype)
    out = torch.empty(num_reqs * length, args.heads * args.head_size, dtype=dtype, device="cuda")
    ms = triton.testing.do_bench(lambda: backend.prefill(query, cache, metadata, out),
                                 warmup=25, rep=200, return_mode="median")
    flops = 4 * args.heads * args.head_size * num_reqs * length * (length + 1) / 2
    return {"num_reqs": num_reqs, "length": length, "ms": ms, "TFLOPs": flops / ms / 1e9}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--spread", type=float, default=0.0,
                   help="contexts uniform in context x [1 - spread, 1 + spread]")
    p.add_argument("--no-prefill", action="store_true", help="skip the prefill rate")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--sweep", action="store_true", help="also time other launch settings")
    p.add_argument("--splits", default="",
                   help="also time the default tiles with these split counts, e.g. 1,2,4,8")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()

    copy_bw = copy_bandwidth()
    spec, cache, table, query, seq_lens, slots, nbytes = make_case(args)
    result = {"gpu": torch.cuda.get_device_name(), "shape": vars(args) | {"sweep": None},
              "bytes": nbytes, "copy_GBps": copy_bw / 1e9, "runs": []}

    def record(label, launch, splits):
        ms, used = time_decode(spec, launch, splits, cache, table, query, seq_lens, slots)
        bw = nbytes / (ms * 1e-3)
        row = {"label": label, "block_n": launch.block_n(spec.head_size, decode=True),
               "warps": launch.decode_warps,
               "stages": launch.decode_stages, "splits": used, "ms": ms, "GBps": bw / 1e9,
               "of_copy": bw / copy_bw}
        result["runs"].append(row)
        print(f"{label:>8} block_n {row['block_n']:>3} warps {row['warps']} stages "
              f"{row['stages']} splits {used:>2}: {ms * 1e3:8.1f} us  {bw / 1e9:7.0f} GB/s  "
              f"{100 * bw / copy_bw:5.1f}% of copy", flush=True)
        return row

    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s; decode reads {nbytes / 1e9:.3f} GB",
          flush=True)
    default = record("default", TritonPagedAttentionBackend.launch, None)

    if args.sweep:
        base = TritonLaunchConfig()
        for block_n, warps, stages, splits in itertools.product(
                (32, 64, 128), (2, 4, 8), (2, 3, 4), (1, 2)):
            launch = dataclasses.replace(base, decode_block_n=block_n, decode_warps=warps,
                                         decode_stages=stages)
            try:
                record("sweep", launch, splits)
            except Exception as exc:       # e.g. out of shared memory: report and go on
                print(f"   sweep block_n {block_n} warps {warps} stages {stages} splits "
                      f"{splits}: failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
    for splits in [int(n) for n in args.splits.split(",") if n]:
        record(f"splits={splits}", TritonPagedAttentionBackend.launch, splits)
    if args.spread:
        # The same batch with the longest contexts first: how much the ragged tail costs.
        order = torch.argsort(seq_lens, descending=True)
        seq_lens, table = seq_lens[order].contiguous(), table[order].contiguous()
        record("longest", TritonPagedAttentionBackend.launch, None)
    for head_size, heads in () if args.no_prefill else ((64, 32), (args.head_size, args.heads)):
        shape = argparse.Namespace(**(vars(args) | {"head_size": head_size, "heads": heads}))
        rate = prefill_rate(shape)
        result.setdefault("prefill", []).append(rate | {"head_size": head_size})
        print(f"prefill {rate['num_reqs']} x {rate['length']} tokens, head size {head_size}: "
              f"{rate['ms'] * 1e3:.0f} us, {rate['TFLOPs']:.0f} TFLOP/s attention", flush=True)
    best = max(result["runs"], key=lambda r: r["GBps"])
    result["default"], result["best"] = default, best
    print(f"default: {100 * default['of_copy']:.1f}% of copy bandwidth "
          f"({default['GBps']:.0f} / {copy_bw / 1e9:.0f} GB/s); best: "
          f"{100 * best['of_copy']:.1f}% (block_n {best['block_n']}, warps {best['warps']}, "
          f"stages {best['stages']}, splits {best['splits']})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
