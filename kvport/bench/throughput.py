"""`kvport bench throughput`: offline throughput of `kvport.LLM`, all requests submitted at once.

W2 shape by default (N prompts of random words, fixed output length); `--random-tokens` gives
the W1 shape (random token ids, prompt and output lengths uniform in ranges, seed 0). Every
request ignores EOS, so the work is fixed. `--peer-hf-static BATCH` runs transformers' static
`generate` on the same model and token ids in the same run and prints kvport/HF.
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from typing import Any

from kvport.bench.machine import machine_info, now_iso
from kvport.bench.prompts import new_run_id, random_token_requests, word_prompts


def add_bench_throughput_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("throughput", help="offline engine throughput (W2 or W1 shape)",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    e = p.add_argument_group("engine")
    e.add_argument("--model", default=None,
                   help="HF directory or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    e.add_argument("--device", default=None, help="platform name (default: the best one)")
    e.add_argument("--dtype", default="auto")
    e.add_argument("--max-num-seqs", type=int, default=None)
    e.add_argument("--max-num-batched-tokens", type=int, default=None)
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--kv-cache-memory", default=None, help="e.g. 2GiB")
    e.add_argument("--tensor-parallel-size", "-tp", type=int, default=None,
                   help="devices holding a slice of every layer (default: 1)")
    e.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other LLM(...) keyword (value parsed as JSON if it can be)")
    w = p.add_argument_group("workload")
    w.add_argument("--num-prompts", type=int, default=64)
    w.add_argument("--prompt-words", type=int, default=128, help="W2 prompt length in words")
    w.add_argument("--output-len", type=int, default=128, help="W2 output tokens")
    w.add_argument("--random-tokens", action="store_true",
                   help="W1 shape: random token ids, lengths from the two ranges below")
    w.add_argument("--input-len-range", default="100,1024", metavar="LO,HI")
    w.add_argument("--output-len-range", default="100,1024", metavar="LO,HI")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--run-id", default=None, help="W2 prompt salt (default: fresh per run)")
    o = p.add_argument_group("peer and output")
    o.add_argument("--peer-hf-static", type=int, default=None, metavar="BATCH",
                   help="also run HF transformers static generate in batches of BATCH")
    o.add_argument("--output-json", default=None, metavar="PATH")
    p.set_defaults(func=run_bench_throughput)
    return p


def _range(text: str) -> tuple[int, int]:
    lo, hi = (int(v) for v in text.split(","))
    return lo, hi


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = {k: getattr(args, k) for k in ("max_num_seqs", "max_num_batched_tokens",
                                             "max_model_len", "kv_cache_memory",
                                             "tensor_parallel_size")
              if getattr(args, k) is not None}
    for item in args.engine_arg:
        key, _, value = item.partition("=")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return kwargs


def build_requests(args: argparse.Namespace, tokenizer, run_id: str
                   ) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) pairs; W2 prompts are tokenized once so kvport and
    the HF peer see identical ids."""
    if args.random_tokens:
        return random_token_requests(args.num_prompts, _range(args.input_len_range),
                                     _range(args.output_len_range), seed=args.seed)
    texts = word_prompts(args.num_prompts, args.prompt_words, args.seed, run_id, tag="offline")
    return [(tokenizer.encode(t), args.output_len) for t in texts]


def run_kvport(llm, requests: list[tuple[list[int], int]]) -> dict[str, Any]:
    from kvport import SamplingParams

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    llm.generate([requests[0][0]], params(4), use_tqdm=False)   # warm-up: lazy init, not timed
    start = time.perf_counter()
    outputs = llm.generate([p for p, _ in requests], [params(n) for _, n in requests],
                           use_tqdm=False)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(len(p) for p, _ in requests)
    return {"engine": "kvport", "elapsed_s": elapsed, "output_tokens": generated,
            "requested_output_tokens": sum(n for _, n in requests),
            "output_throughput": generated / elapsed,
            "total_throughput": (generated + prompt_tokens) / elapsed,
            "request_throughput": len(requests) / elapsed}


def run_bench_throughput(args: argparse.Namespace) -> int:
    from kvport import LLM

    run_id = args.run_id or new_run_id()
    llm = LLM(model=args.model, device=args.device, dtype=args.dtype, **engine_kwargs(args))
    engine = llm.engine
    requests = build_requests(args, llm.get_tokenizer(), run_id)
    result: dict[str, Any] = {
        "date": now_iso(), "machine": machine_info(), "run_id": run_id,
        "model": engine.model_info.path, "device": engine.platform.device_type,
        "dtype": engine.config.model.dtype, "engine_kwargs": engine_kwargs(args),
        "workload": {"name": "W1" if args.random_tokens else "W2",
                     "num_requests": len(requests), "seed": args.seed,
                     "prompt_tokens": sum(len(p) for p, _ in requests),
                     "output_tokens": sum(n for _, n in requests)},
    }
    result["kvport"] = run_kvport(llm, requests)
    print(json.dumps({"kvport": result["kvport"]}), flush=True)
    if args.peer_hf_static:
        from kvport.bench.hf_static import run_hf_static

        model_dir, gguf_file = engine.model_info.tokenizer_source
        device = result["device"]
        del llm, engine   # free the KV cache before the peer allocates its own
        gc.collect()
        _empty_device_cache(device)
        result["hf_static"] = run_hf_static(model_dir, gguf_file, result["dtype"], device,
                                            requests, args.peer_hf_static)
        result["ratio_output_throughput"] = (result["kvport"]["output_throughput"]
                                             / result["hf_static"]["output_throughput"])
    print(json.dumps(result, indent=2))
    if args.output_json:
        from kvport.bench.report import write_json
        write_json(args.output_json, result)
    return 0


def _empty_device_cache(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.empty_cache()
