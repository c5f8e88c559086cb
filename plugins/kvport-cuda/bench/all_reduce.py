"""Tensor-parallel all-reduce on this host's GPUs: NCCL against symmetric memory (one shot and
two shot, kvport_cuda/symmetric_all_reduce.py), checked and timed at decode and prefill sizes.

One process per GPU. For each size every method first sums known per-rank tensors and is
compared with the exact sum; then it is timed eagerly (one call at a time) and inside a CUDA
graph of 64 back-to-back calls (a decode step's 2 per layer x 32 layers, as kvport replays
them). Prints a table; --json writes the figures.

    python plugins/kvport-cuda/bench/all_reduce.py --world-size 2 --json all_reduce.json
    python plugins/kvport-cuda/bench/all_reduce.py --fused-norm-only     # the check alone

--fused-norm (and --fused-norm-only) also checks kvport_cuda/all_reduce_norm.py's fused
all-reduce + residual add + RMSNorm at decode row counts: every rank must get the same bits,
equal to the sum rounded once, added to the residual and normalised by FusedRMSNorm's kernel;
then times it against the symmetric all-reduce followed by that norm (CUDA graph, 64 calls).
Exit status 1 if any check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import socket

import torch
import torch.multiprocessing as mp

SIZES_KIB = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 32768)
HIDDEN = 4096           # elements per token of the all-reduced activations (Llama-3.1-8B)


def methods(fast):
    """name -> in-place all-reduce of a bf16 tensor."""
    import torch.distributed as dist
    ops = torch.ops.symm_mem

    def staged(x):
        buf = fast.buffer[:x.numel()]
        buf.copy_(x.view(-1))
        return buf

    def one_shot(x):
        ops.one_shot_all_reduce_out(staged(x), "sum", fast.group_name, x.view(-1))

    def two_shot(x):
        buf = staged(x)
        ops.two_shot_all_reduce_(buf, "sum", fast.group_name)
        x.view(-1).copy_(buf)

    return {"nccl": dist.all_reduce, "one_shot": one_shot, "two_shot": two_shot,
            "kvport": fast.all_reduce_}


def check(fn, numel, rank, world, device) -> float:
    """Largest relative error of fn's sum against the exact one (inputs known on every rank)."""
    parts = [torch.randn(numel, generator=torch.Generator().manual_seed(100 + r))
             for r in range(world)]
    exact = torch.stack(parts).sum(0)
    x = parts[rank].to(device, torch.bfloat16)
    fn(x)
    torch.cuda.synchronize()
    return float(((x.float().cpu() - exact).abs().max() / exact.abs().max()))


def time_eager(fn, x, iters=200) -> float:
    for _ in range(10):
        fn(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn(x)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters        # microseconds per call


def time_graph(fn, x, calls=64, replays=20) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn(x)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * calls)


FUSED_ROWS = (1, 8, 64, 200, 256)


def fused_norm_rows(fast, rank: int, world: int, device) -> list[dict]:
    """The fused all-reduce + add + norm against the separate ops, checked and timed."""
    import torch.distributed as dist
    from kvport_cuda.all_reduce_norm import AllReduceNorm
    from kvport_cuda.fused_norm import rms_norm
    fused = AllReduceNorm(fast, HIDDEN)
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(HIDDEN, generator=gen).to(device, torch.bfloat16)
    rows_out = []
    for rows in FUSED_ROWS:
        parts = [torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(200 + r))
                 .to(torch.bfloat16) for r in range(world)]
        residual = torch.randn(rows, HIDDEN, generator=gen).to(device, torch.bfloat16)
        total = torch.zeros(rows, HIDDEN)
        for part in parts:                                   # rank order, float32
            total += part.float()
        expected_out, expected_res = rms_norm(total.to(device, torch.bfloat16), weight, 1e-5,
                                              residual)
        for region in (0, 1):
            fused.region_view(region, rows).copy_(parts[rank].to(device))
        staged = fused.region_view(0, rows)
        out, res = fused.all_reduce_add_rms_norm(staged, residual, weight, 1e-5, 0)
        torch.cuda.synchronize()
        gathered = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(gathered, out)
        row = {"rows": rows,
               "equal_to_separate_ops": bool(torch.equal(out, expected_out)
                                             and torch.equal(res, expected_res)),
               "max_abs_diff": float((out.float() - expected_out.float()).abs().max()),
               "same_on_every_rank": all(torch.equal(g, gathered[0]) for g in gathered)}
        calls = iter(range(10**9))

        def fused_call(_):                        # the regions alternate, as in the model
            region = next(calls) % 2
            fused.all_reduce_add_rms_norm(fused.region_view(region, rows), residual, weight,
                                          1e-5, region)

        plain = fast.staging_for((rows, HIDDEN), torch.bfloat16)
        plain.copy_(parts[rank].to(device))

        def separate(_):
            rms_norm(fast.all_reduce_staged(plain), weight, 1e-5, residual)
        row["fused_graph_us"] = time_graph(fused_call, None)
        row["separate_graph_us"] = time_graph(separate, None)
        rows_out.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    return rows_out


def worker(rank: int, world: int, port: int, out: str | None, fused_norm: bool,
           fused_only: bool) -> None:
    import torch.distributed as dist
    from kvport_cuda.symmetric_all_reduce import (SymmetricAllReduceLimits,
                                                  SymmetricMemoryAllReduce)
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    dist.all_reduce(torch.zeros(1, device=device))
    fast = SymmetricMemoryAllReduce(device, torch.bfloat16,
                                    SymmetricAllReduceLimits(max_bytes=max(SIZES_KIB) * 1024))
    rows = []
    for kib in (() if fused_only else SIZES_KIB):
        numel = kib * 1024 // 2
        row = {"kib": kib, "tokens_of_4096": numel // HIDDEN}
        for name, fn in methods(fast).items():
            x = torch.randn(numel, device=device).to(torch.bfloat16)
            try:
                row[f"{name}_rel_err"] = check(fn, numel, rank, world, device)
                row[f"{name}_eager_us"] = time_eager(fn, x)
                row[f"{name}_graph_us"] = time_graph(fn, x)
            except Exception as exc:           # recorded; the other methods still run
                row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    fused_rows = fused_norm_rows(fast, rank, world, device) if fused_norm or fused_only else []
    if rank == 0 and out:
        with open(out, "w") as f:
            json.dump({"world_size": world, "gpu": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "rows": rows,
                       "fused_norm_rows": fused_rows}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    failed = [r["rows"] for r in fused_rows
              if not (r["equal_to_separate_ops"] and r["same_on_every_rank"])]
    if failed:
        raise SystemExit(f"rank {rank}: the fused all-reduce + norm differs at rows {failed}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--fused-norm", action="store_true",
                   help="also check and time the fused all-reduce + residual add + RMSNorm")
    p.add_argument("--fused-norm-only", action="store_true", help="only that")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    mp.spawn(worker, args=(args.world_size, port, args.json, args.fused_norm,
                           args.fused_norm_only), nprocs=args.world_size)


if __name__ == "__main__":
    main()
