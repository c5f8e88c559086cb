"""W1 throughput on one GPU: kvport against Hugging Face transformers' continuous batching, on
the same random-weight Llama-3.2-1B-shaped bf16 model and the same requests, in one run;
both ratios issue 4 asks for (kvport / transformers CB, kvport / roofline ceiling) printed.

The model is built exactly as /work/shared/tools/peers_gpu.py builds it (same config, seed
0, transformers' init), saved as a Hugging Face directory with a word-level tokenizer of the
full vocabulary (token i is "t<i>"), and loaded by kvport from there. The requests are W1's
(256, prompt and output lengths uniform in [100, 1024], token ids in [0, 10000], seed 0,
ignore_eos). `--tools DIR` names a folder holding copies of peers_gpu.py and roofline.py
(scripts/gpu_check.sh carries them); the ceilings (copy bandwidth, bf16 matmul rate) are
measured in the same run and fed to the roofline.

kvport's run is instrumented (wrapping the engine's and runner's methods in this process) to
give a step breakdown: scheduling, input preparation, model launch, sampling (which waits
for the GPU), the scheduler's update, and output processing with detokenization.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections import defaultdict

import torch

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=True)
TINY = dict(LLAMA_1B, vocab_size=12000, hidden_size=128, intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def word_tokenizer(path: str, vocab_size: int) -> None:
    """A word-level tokenizer whose token i is "t<i>": every id decodes, cheaply."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1",
                            bos_token="t2").save_pretrained(path)


def build_model(path: str, config: dict, device: str):
    """peers_gpu.py's model (seed 0, transformers' init, bf16), saved to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16).eval()
    model.save_pretrained(path)
    word_tokenizer(path, config["vocab_size"])
    return model


class StepTimer:
    """Seconds spent in wrapped methods, accumulated per phase (this benchmark only)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._wrapped: list = []

    def restore(self) -> None:
        """Undo every wrap (a class attribute wrapped here must not outlive the run)."""
        for obj, attr, original in reversed(self._wrapped):
            if original is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, original)
        self._wrapped.clear()

    def wrap(self, obj, attr: str, phase: str) -> None:
        fn = getattr(obj, attr)
        self._wrapped.append((obj, attr, obj.__dict__.get(attr)))

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start
                self.calls[phase] += 1
        setattr(obj, attr, timed)

    def breakdown(self, total: float) -> dict[str, float]:
        s = self.seconds
        phases = {
            "scheduling": s["schedule"],
            "worker launch (input preparation + kernel launches)": s["launch"],
            "  of which graph replay": s["graph replay"],
            "  of which eager forward": s["eager forward"],
            "waiting for the GPU (sampled ids to the host)": s["wait"],
            "scheduler update": s["update"],
            "output processing + detokenization": s["step"] - s["schedule"] - s["launch"]
            - s["wait"] - s["update"],
        }
        phases["outside engine.step"] = total - s["step"]
        return phases


def instrument(engine) -> StepTimer:
    """Time the engine's phases. With async scheduling the host work of a step overlaps the
    GPU, so "waiting for the GPU" is the time the host had nothing left to do."""
    from kvport.torch_worker.pending import PendingSample

    timer = StepTimer()
    runner = engine.worker.runner
    timer.wrap(engine, "_step", "step")
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(engine.scheduler, "update_from_output", "update")
    timer.wrap(engine.worker, "execute_model_async", "launch")
    timer.wrap(PendingSample, "result", "wait")
    if getattr(runner, "graphs", None) is not None:
        timer.wrap(runner.graphs, "run", "graph replay")
    if hasattr(runner, "_forward_eager"):
        timer.wrap(runner, "_forward_eager", "eager forward")
    return timer


def run_kvport(path: str, requests, args, async_scheduling: bool = True) -> dict:
    from kvport import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=path, device=args.device, dtype="bfloat16", max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=4096,
              gpu_memory_utilization=args.gpu_memory_utilization,
              enforce_eager=args.enforce_eager, async_scheduling=async_scheduling)
    startup = time.perf_counter() - start
    engine = llm.engine

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    llm.generate([requests[0][0]], params(4), use_tqdm=False)       # warm-up, not timed
    timer = instrument(engine)
    steps_before = engine.stats.num_steps
    start = time.perf_counter()
    outputs = llm.generate([p for p, _ in requests], [params(n) for _, n in requests],
                           use_tqdm=False)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    steps = engine.stats.num_steps - steps_before
    result = {"elapsed_s": elapsed, "output_tokens": generated, "steps": steps,
              "output_tok_s": generated / elapsed, "startup_s": startup,
              "num_kv_blocks": engine.num_blocks, "preemptions": engine.scheduler.num_preemptions,
              "settings": {"async_scheduling": engine.async_scheduling,
                           "max_num_seqs": args.max_num_seqs,
                           "max_num_batched_tokens": args.max_num_batched_tokens,
                           "enforce_eager": args.enforce_eager,
                           "gpu_memory_utilization": args.gpu_memory_utilization},
              "breakdown_s": timer.breakdown(elapsed), "calls": dict(timer.calls)}
    profile = getattr(engine.worker, "memory_profile", None)
    if profile is not None:
        result["memory"] = profile.describe()
    if args.profile:
        result["kernels"] = profile_kernels(llm, requests, params)
    timer.restore()
    engine.shutdown()
    return result


def profile_kernels(llm, requests, params, decode_tokens: int = 48) -> list[dict]:
    """GPU time by kernel over a short run (W1's prompts, `decode_tokens` outputs each):
    where a step's device time goes. Run after the timed run; the profiler slows it."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        llm.generate([p for p, _ in requests], params(decode_tokens), use_tqdm=False)
    rows = []
    for event in prof.key_averages():
        device_us = (getattr(event, "device_time_total", 0) if on_gpu
                     else event.self_cpu_time_total)
        if device_us > 0:
            rows.append({"kernel": event.key[:90], "calls": event.count,
                         "device_ms": device_us / 1e3})
    rows.sort(key=lambda r: -r["device_ms"])
    total = sum(r["device_ms"] for r in rows)
    for r in rows[:20]:
        print(f"{r['device_ms']:9.1f} ms {100 * r['device_ms'] / total:5.1f}% "
              f"{r['calls']:7d}x  {r['kernel']}", flush=True)
    return rows[:40]


def run_hf_cb(model, requests) -> dict:
    """transformers' continuous batching, as tools/peers_gpu.py runs it."""
    from transformers import GenerationConfig

    gen_config = GenerationConfig(max_new_tokens=1024, do_sample=False, eos_token_id=-1,
                                  pad_token_id=0)
    start = time.perf_counter()
    with model.continuous_batching_context_manager(generation_config=gen_config) as manager:
        ready = time.perf_counter()
        ids = [manager.add_request(p, max_new_tokens=o, eos_token_id=-1) for p, o in requests]
        done = generated = 0
        while done < len(ids):
            r = manager.get_result(timeout=5)
            if r is not None and r.is_finished():
                done += 1
                generated += len(r.generated_tokens)
    end = time.perf_counter()
    return {"s": end - ready, "warmup_s": ready - start, "gen_tokens": generated,
            "out_tok_s": generated / (end - ready)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tools", default=None, help="folder with peers_gpu.py and roofline.py")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--peer", action="store_true", help="run transformers CB in this run too")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--compare-sync", action="store_true",
                   help="also run kvport without async scheduling (for the record)")
    p.add_argument("--profile", action="store_true",
                   help="after the timed run, print GPU time by kernel over a short run")
    p.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke test (--tiny)")
    p.add_argument("--tiny", action="store_true", help="a tiny model: checks this script")
    p.add_argument("--model-dir", default="/tmp/kvport-w1-llama")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from kvport.bench.prompts import random_token_requests

    requests = random_token_requests(args.num_prompts, (100, 1024), (100, 1024), seed=0)
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
                    "workload": {"n": len(requests),
                                 "prompt_tokens": sum(len(q) for q, _ in requests),
                                 "output_tokens": sum(n for _, n in requests)}}
    peers_gpu = roofline = None
    if args.tools:
        sys.path.insert(0, os.path.abspath(args.tools))
        import peers_gpu
        import roofline
        assert peers_gpu.workload(args.num_prompts) == requests, "W1 requests differ"
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
        if peers_gpu is not None:
            bw, flops = peers_gpu.ceilings()
            result["copy_GBps"], result["bf16_TFLOPs"] = bw / 1e9, flops / 1e12
            print(json.dumps({"ceilings": [result["copy_GBps"], result["bf16_TFLOPs"]]}),
                  flush=True)
    model = build_model(args.model_dir, TINY if args.tiny else LLAMA_1B, args.device)
    result["kvport"] = run_kvport(args.model_dir, requests, args)
    print(json.dumps({"kvport": result["kvport"]}, indent=1), flush=True)
    if args.compare_sync:
        result["kvport_sync"] = run_kvport(args.model_dir, requests, args,
                                           async_scheduling=False)
        print(json.dumps({"kvport_sync": result["kvport_sync"]}, indent=1), flush=True)
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    if args.peer:
        result["hf_cb"] = run_hf_cb(model, requests)
        result["ratio_vs_hf_cb"] = result["kvport"]["output_tok_s"] / result["hf_cb"]["out_tok_s"]
        print(json.dumps({"hf_cb": result["hf_cb"]}), flush=True)
    if roofline is not None and "copy_GBps" in result:
        lengths = [(len(q), n) for q, n in requests]
        floor = roofline.floor_seconds(lengths, roofline.LLAMA_1B, result["copy_GBps"] * 1e9,
                                       result["bf16_TFLOPs"] * 1e12)
        result["roofline"] = {"floor_s": floor,
                              "ceiling_tok_s": result["workload"]["output_tokens"] / floor}
        result["ratio_vs_roofline"] = (result["kvport"]["output_tok_s"]
                                       / result["roofline"]["ceiling_tok_s"])
    summary = {k: result.get(k) for k in ("ratio_vs_hf_cb", "ratio_vs_roofline")}
    summary["kvport_tok_s"] = result["kvport"]["output_tok_s"]
    summary["kvport_sync_tok_s"] = result.get("kvport_sync", {}).get("output_tok_s")
    summary["hf_cb_tok_s"] = result.get("hf_cb", {}).get("out_tok_s")
    summary["ceiling_tok_s"] = result.get("roofline", {}).get("ceiling_tok_s")
    print("W1 summary: " + json.dumps(summary), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
