"""Micro-benchmarks for CPU serving: attention backends, a real SmolLM2 decode step, and
weight precisions for the matmuls. Not a test; prints tables.

    python plugins/kvport-cpu/bench_attention.py                 # everything
    python plugins/kvport-cpu/bench_attention.py attention matmul
    python plugins/kvport-cpu/bench_attention.py model --model-batch 32 --prompt-len 128
    python plugins/kvport-cpu/bench_attention.py native
    python plugins/kvport-cpu/bench_attention.py model --model-dtypes float32 --quantization int8

Sections:
  attention  torch_reference vs cpu_paged, one layer's forward (K/V write + attention) with
             SmolLM2-135M shapes (9 heads, 3 KV heads, head 64, block 16): decode batch
             1/8/32 at context 256/1024 (and mixed lengths), a 512-token prefill, in float32
             and bfloat16 caches; plus cpu_paged's decode-grouping variants.
  model      one decode step of the real SmolLM2-135M (LLM(), float32 then bfloat16) at
             batch 1 and 32, split into attention / rest of the model / logits+sampling /
             engine, for both backends (swapped on the same engine: same cache layout), and
             the top torch ops of a profiled cpu_paged step.
  matmul     fp32 vs bf16 vs int8 weight-only (torch._weight_int8pack_mm, activations fp32
             or bf16) vs dynamic int8 x int8 (quantized.linear_dynamic, VNNI) for
             [1|32, 576] x [576, 1536] and [1|32, 576] x [576, 49152]; e = relative error.

Timings are medians of interleaved repetitions (variants alternate, so background load hits
all of them alike). Threads: --threads (default 2).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(os.path.dirname(_HERE))]   # this checkout first

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kvport.attention_backends.interface import AttentionSpec, CommonAttentionMetadata  # noqa: E402
from kvport.attention_backends.torch_reference import TorchReferenceBackend  # noqa: E402
from kvport_cpu.attention import CpuPagedAttentionBackend  # noqa: E402

HEADS, KV_HEADS, HEAD_SIZE, BLOCK, LAYERS = 9, 3, 64, 16, 30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def interleaved(fns: dict, reps: int, warmup: int = 1) -> dict[str, float]:
    """Median ms per call of each function, the functions alternating."""
    times = {name: [] for name in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in r] for r in [headers] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    print(flush=True)


# ------------------------------------------------------------------------- attention
def make_step(contexts: list[int], query_lens: list[int], dtype: str, seed: int = 0):
    """A step of requests with these prior contexts and query lengths (SmolLM2 shapes),
    shuffled blocks, randn cache and inputs."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    seq_lens = np.array([c + q for c, q in zip(contexts, query_lens)], dtype=np.int32)
    needed = -(-seq_lens // BLOCK)
    num_blocks = int(needed.sum()) + 1
    free = list(rng.permutation(np.arange(1, num_blocks)))
    block_table = np.zeros((len(contexts), int(needed.max())), dtype=np.int32)
    for i, n in enumerate(needed):
        block_table[i, :n] = [free.pop() for _ in range(n)]
    qsl = np.zeros(len(contexts) + 1, dtype=np.int32)
    qsl[1:] = np.cumsum(query_lens)
    slots = []
    for i, (c, q) in enumerate(zip(contexts, query_lens)):
        pos = np.arange(c, c + q)
        slots.append(block_table[i, pos // BLOCK].astype(np.int64) * BLOCK + pos % BLOCK)
    common = CommonAttentionMetadata(qsl, seq_lens, block_table, np.concatenate(slots))
    spec = AttentionSpec(HEADS, KV_HEADS, HEAD_SIZE, BLOCK, dtype, HEAD_SIZE ** -0.5)
    td = DTYPES[dtype]
    T = int(qsl[-1])
    cache = torch.randn(2, num_blocks, BLOCK, KV_HEADS, HEAD_SIZE, generator=gen).to(td)
    q = torch.randn(T, HEADS, HEAD_SIZE, generator=gen).to(td)
    k = torch.randn(T, KV_HEADS, HEAD_SIZE, generator=gen).to(td)
    v = torch.randn(T, KV_HEADS, HEAD_SIZE, generator=gen).to(td)
    return spec, common, (q, k, v, cache)


def bench_attention(reps: int) -> None:
    print("== attention: one layer's forward (K/V write + attention), ms; step = "
          f"{LAYERS} layers + one build_metadata ==")
    cases = [(f"decode B={b} ctx={c}", [c - 1] * b, [1] * b)
             for c in (256, 1024) for b in (1, 8, 32)]
    rng = np.random.default_rng(1)
    mixed = sorted(rng.integers(64, 1024, 32).tolist())
    rng.shuffle(mixed)
    cases.append(("decode B=32 ctx 64..1024", mixed, [1] * 32))
    cases.append(("prefill 512 (no context)", [0], [512]))
    cases.append(("prefill 512 after 512 ctx", [512], [512]))
    cases.append(("mixed: 16 decodes@512 + prefill 256", [511] * 16 + [0], [1] * 16 + [256]))
    rows = []
    for dtype in DTYPES:
        for name, contexts, qlens in cases:
            spec, common, (q, k, v, cache) = make_step(contexts, qlens, dtype)
            ref, fast = TorchReferenceBackend(spec), CpuPagedAttentionBackend(spec)
            ref_meta, fast_meta = ref.build_metadata(common, "cpu"), fast.build_metadata(common, "cpu")
            n = reps if "1024" not in name or "B=1 " in name else max(reps // 2, 3)
            t = interleaved({
                "ref": lambda: ref.forward(q, k, v, cache, ref_meta),
                "fast": lambda: fast.forward(q, k, v, cache, fast_meta),
                "meta": lambda: fast.build_metadata(common, "cpu"),
            }, n)
            err = (fast.forward(q, k, v, cache.clone(), fast_meta).float()
                   - ref.forward(q, k, v, cache.clone(), ref_meta).float()).abs().max().item()
            rows.append([name, dtype, f"{t['ref']:.3f}", f"{t['fast']:.3f}",
                         f"{t['ref'] / t['fast']:.1f}x", f"{t['meta']:.3f}",
                         f"{LAYERS * t['ref']:.1f}", f"{LAYERS * t['fast'] + t['meta']:.1f}",
                         f"{err:.1e}"])
    print_table(["case", "dtype", "ref/layer", "cpu_paged/layer", "speedup", "build_meta",
                 "ref/step", "cpu_paged/step", "max|diff|"], rows)

    print("== cpu_paged decode grouping variants (ms per layer) ==")
    variants = {"default (4MiB x threads, split >25% waste)": {},
                "one group (no split, no cap)": dict(max_group_bytes=2**62,
                                                     split_waste_fraction=1e9),
                "64MiB groups": dict(max_group_bytes=64 * 2**20),
                "16MiB groups": dict(max_group_bytes=16 * 2**20),
                "2MiB groups": dict(max_group_bytes=2 * 2**20),
                "1 request per group": dict(max_group_bytes=1)}
    rows = []
    for dtype in DTYPES:
        for name, contexts in (("B=32 ctx=1024", [1023] * 32), ("B=32 ctx 64..1024", mixed)):
            spec, common, (q, k, v, cache) = make_step(contexts, [1] * 32, dtype)
            fns = {}
            for label, attrs in variants.items():
                backend = CpuPagedAttentionBackend(spec)
                backend.use_native_decode = False
                for a, val in attrs.items():
                    setattr(backend, a, val)
                meta = backend.build_metadata(common, "cpu")
                fns[label] = (lambda b=backend, m=meta: b.forward(q, k, v, cache, m))
                fns[label].groups = len(meta.decode_groups)
            t = interleaved(fns, max(reps // 2, 3))
            rows.append([name, dtype] + [f"{t[label]:.2f} ({fns[label].groups}g)"
                                         for label in variants])
    print_table(["case", "dtype"] + list(variants), rows)


# ---------------------------------------------------------------------------- native
def bench_native(reps: int) -> None:
    print("== cpu_paged decode paths: native op (blocks read in place) vs gather + SDPA, "
          f"ms per layer; step = {LAYERS} layers ==")
    rows = []
    for dtype in DTYPES:
        for batch in (1, 32):
            for ctx in (200, 1000):
                rng = np.random.default_rng(batch + ctx)
                contexts = (ctx - 1 + rng.integers(-32, 33, batch)).tolist()   # ragged
                spec, common, (q, k, v, cache) = make_step(contexts, [1] * batch, dtype)
                gather = CpuPagedAttentionBackend(spec)
                gather.use_native_decode = False
                native = CpuPagedAttentionBackend(spec)
                if native.decode_path != "native":
                    print(f"native decode unavailable: {native.decode_path}\n")
                    return
                g_meta, n_meta = gather.build_metadata(common, "cpu"), native.build_metadata(common, "cpu")
                nd, out = n_meta.native_decode, torch.empty(batch, HEADS, HEAD_SIZE)
                op, qf = native._native_decode_op()[0], q.float()
                t = interleaved({
                    "gather": lambda: gather.forward(q, k, v, cache, g_meta),
                    "native": lambda: native.forward(q, k, v, cache, n_meta),
                    "op": lambda: op(out, qf, cache, nd.block_table, nd.seq_lens, spec.scale),
                }, reps if batch == 1 else max(reps // 2, 5))
                err = (native.forward(q, k, v, cache, n_meta).float()
                       - gather.forward(q, k, v, cache, g_meta).float()).abs().max().item()
                kv_bytes = 2 * int(common.seq_lens.sum()) * KV_HEADS * HEAD_SIZE * \
                    cache.element_size()
                rows.append([dtype, batch, f"~{ctx}", f"{t['gather']:.3f}", f"{t['native']:.3f}",
                             f"{t['gather'] / t['native']:.2f}x", f"{t['op']:.3f}",
                             f"{kv_bytes / t['op'] / 1e6:.1f}", f"{LAYERS * t['gather']:.1f}",
                             f"{LAYERS * t['native']:.1f}", f"{err:.1e}"])
    print_table(["dtype", "batch", "ctx", "gather+sdpa/layer", "native/layer", "speedup",
                 "op alone", "op GB/s of KV", "gather/step", "native/step", "max|diff|"], rows)


# ----------------------------------------------------------------------------- model
class Timed:
    """Wraps a callable, adding up the seconds spent in it."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t


def bench_model(batches: list[int], prompt_len: int, steps: int, threads: int,
                dtypes: list[str], quantization: str | None = None) -> None:
    from kvport import LLM, SamplingParams

    print(f"== SmolLM2-135M decode step (prompt {prompt_len} tokens, {steps} timed steps per "
          f"backend, interleaved, quantization {quantization}), ms per step ==")
    rows, profiles = [], []
    for dtype in dtypes:
        max_batch = max(batches)
        llm = LLM(None, device="cpu", dtype=dtype, attention_backend="cpu_paged",
                  max_model_len=prompt_len + 8 * steps + 64, num_threads=threads,
                  num_blocks=max_batch * (-(-(prompt_len + 8 * steps + 64) // BLOCK)) + 16,
                  enable_prefix_caching=False, max_num_seqs=max_batch,
                  quantization=quantization)
        engine = llm.engine
        worker, runner = engine.worker, engine.worker.runner
        fast = worker.attn_backend
        ref = TorchReferenceBackend(fast.spec)
        gather = CpuPagedAttentionBackend(fast.spec)
        gather.use_native_decode = False
        backends = ((f"cpu_paged ({fast.decode_path})", fast), ("cpu_paged (gather+sdpa)", gather),
                    ("torch_reference", ref))
        holders = [m for m in runner.model.modules() if hasattr(m, "attn_backend")]
        timers = {}
        for name, backend in backends:
            timers[name] = Timed(backend.forward)
            backend.forward = timers[name]

        def use(backend):
            runner.attn_backend = backend
            for m in holders:
                m.attn_backend = backend

        model_timer = Timed(runner.model.forward)
        runner.model.forward = model_timer
        execute_timer = Timed(runner.execute)
        runner.execute = execute_timer

        rng = np.random.default_rng(0)
        vocab = int(engine.model_info.vocab_size)
        params = SamplingParams(temperature=0, max_tokens=100000, ignore_eos=True)
        ids = [engine.add_request(None, rng.integers(100, vocab - 100, prompt_len).tolist(),
                                  params) for _ in range(max_batch)]
        use(fast)
        t = time.perf_counter()
        while any(len(r.output_token_ids) == 0 for r in engine.scheduler.running) or \
                engine.scheduler.waiting:
            engine.step()
        print(f"[{dtype}] prefill of {max_batch} x {prompt_len} tokens: "
              f"{time.perf_counter() - t:.1f}s", flush=True)
        for batch in sorted(batches, reverse=True):
            for request_id in ids[batch:]:
                engine.abort(request_id)
            ids = ids[:batch]
            engine.step()                                   # settle after the aborts
            result = {name: {k: [] for k in ("step", "execute", "model", "attn")}
                      for name in timers}
            for _ in range(steps):
                for name, backend in backends:
                    use(backend)
                    before = (execute_timer.seconds, model_timer.seconds, timers[name].seconds)
                    t = time.perf_counter()
                    engine.step()
                    step = time.perf_counter() - t
                    r = result[name]
                    r["step"].append(step)
                    r["execute"].append(execute_timer.seconds - before[0])
                    r["model"].append(model_timer.seconds - before[1])
                    r["attn"].append(timers[name].seconds - before[2])
            ctx = prompt_len + len(engine.scheduler.running[0].output_token_ids)
            for name, r in result.items():
                med = {k: statistics.median(v) * 1e3 for k, v in r.items()}
                rows.append([dtype, batch, f"~{ctx}", name, f"{med['step']:.1f}",
                             f"{med['attn']:.1f}", f"{med['model'] - med['attn']:.1f}",
                             f"{med['execute'] - med['model']:.1f}",
                             f"{med['step'] - med['execute']:.1f}",
                             f"{100 * med['attn'] / med['step']:.0f}%",
                             f"{batch * 1e3 / med['step']:.0f}"])
            use(fast)
            profiles.append((dtype, batch, profile_step(engine)))
        for request_id in ids:
            engine.abort(request_id)
        del llm, engine, worker, runner
    print_table(["dtype", "batch", "ctx", "backend", "step", "attention", "rest of model",
                 "logits+sample", "engine", "attn share", "tok/s"], rows)
    for dtype, batch, table in profiles:
        print(f"-- profiled cpu_paged decode step, {dtype}, batch {batch}: top ops by self CPU "
              "time (3 steps) --")
        print(table, flush=True)


def profile_step(engine, steps: int = 3) -> str:
    from torch.profiler import ProfilerActivity, profile
    engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10,
                                     max_name_column_width=45)


# ---------------------------------------------------------------------------- matmul
def dynamic_int8_weight(w: torch.Tensor):
    """fbgemm/onednn int8 x int8 (VNNI) prepacked weight, per-channel scales: the dynamic
    quantization path (activations quantized per call). None where the build lacks it."""
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scales = (w.abs().amax(dim=1) / 127).double()
            qw = torch.quantize_per_channel(w, scales, torch.zeros(w.shape[0], dtype=torch.long),
                                            0, torch.qint8)
            return torch.ops.quantized.linear_prepack(qw, None)
    except Exception:   # noqa: BLE001 - an optional, deprecated path
        return None


def bench_matmul(reps: int) -> None:
    print("== weight precision: y = x @ W^T, x [M, 576], ms per call (and GB/s of weights) ==")
    has_int8 = hasattr(torch, "_weight_int8pack_mm")
    rows = []
    for n in (1536, 49152):
        gen = torch.Generator().manual_seed(n)
        w = torch.randn(n, 576, generator=gen) * 0.05
        w_bf16 = w.to(torch.bfloat16)
        scales = w.abs().amax(dim=1) / 127
        w_int8 = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        packed = dynamic_int8_weight(w)
        for m in (1, 32):
            x = torch.randn(m, 576, generator=gen)
            x_bf16 = x.to(torch.bfloat16)
            fns = {"fp32": lambda: torch.nn.functional.linear(x, w),
                   "bf16": lambda: torch.nn.functional.linear(x_bf16, w_bf16)}
            if has_int8:
                fns["int8 (x fp32)"] = lambda: torch._weight_int8pack_mm(x, w_int8, scales)
                fns["int8 (x bf16)"] = lambda: torch._weight_int8pack_mm(
                    x_bf16, w_int8, scales.to(torch.bfloat16))
            if packed is not None:
                fns["dyn int8 x int8"] = lambda: torch.ops.quantized.linear_dynamic(x, packed, False)
            t = interleaved(fns, reps if n == 1536 else max(reps // 2, 3), warmup=2)
            exact = x.double() @ w.double().T
            row = [f"[{m},576]x[576,{n}]"]
            for name, ms in t.items():
                elem = {"fp32": 4, "bf16": 2}.get(name, 1)
                err = (fns[name]().double() - exact).norm() / exact.norm()
                row.append(f"{ms:.3f} ({n * 576 * elem / ms / 1e6:.1f}) e={err:.0e}")
            rows.append(row)
    print_table(["shape"] + list(fns), rows)
    if not has_int8:
        print("torch._weight_int8pack_mm is not available in this torch build\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", metavar="{attention,native,model,matmul}",
                        help="what to run (default: all four)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--model-batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--model-dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--quantization", default=None, help="model section: e.g. int8")
    args = parser.parse_args()
    args.sections = args.sections or ["attention", "native", "model", "matmul"]
    unknown = set(args.sections) - {"attention", "native", "model", "matmul"}
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}\n", flush=True)
    if "attention" in args.sections:
        bench_attention(args.reps)
    if "native" in args.sections:
        bench_native(args.reps)
    if "matmul" in args.sections:
        bench_matmul(args.reps)
    if "model" in args.sections:
        bench_model(args.model_batch, args.prompt_len, args.steps, args.threads,
                    args.model_dtypes, args.quantization)


if __name__ == "__main__":
    main()
