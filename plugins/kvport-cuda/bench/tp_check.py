"""Tensor parallelism on two GPUs: TP=2 against TP=1 on a random-weight Llama-3.1-8B-shaped
bf16 model, for agreement and for throughput, in one run.

    python plugins/kvport-cuda/bench/tp_check.py --json $OUT/tp_check.json --deadline 450
    python plugins/kvport-cuda/bench/tp_check.py --device cpu --tiny     # checks this script

1. build: Llama-3.1-8B's shape (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate
   14336, vocab 128256, untied, rope theta 500000 with llama3 scaling) with transformers'
   init (seed 0) on GPU 0, saved as safetensors with a word-level tokenizer (w1.build_model).
2. for TP=1, then TP=2, one engine each:
   a. teacher forcing: for each of --positions positions of random sequences, a request of
      the sequence up to there, max_tokens 1, greedy, logprobs 2: the top-1 next token and
      its logprob margin over the second;
   b. throughput: W1 (256 requests, prompt and output lengths uniform in [100, 1024], random
      token ids, ignore_eos, seed 0), timed from submission to the last token.
3. agreement of TP=2's top-1 with TP=1's at every position, and at the decisive positions
   (TP=1's top-1 margin above 4x the RMS difference of the top-1 logprob between the two
   runs: random weights put many top-2 logits closer than bf16 rounding); the throughput
   ratio TP=2 / TP=1 (goal: 1.6x). --tp1-self-check: TP=1 teacher-forced a second time in
   reverse order, and TP=1's agreement with itself (the noise floor of the first figure).
   --tp-invariant: TP=1 and TP=2 once more under tp_invariant, whose agreement should be
   every position with equal logprobs (kvport/models/invariant.py), and what it costs.
   Each W1 run also records its steps by phase (`step_phases`: prefill chunks while prompts
   wait, then decode steps by how many requests ran), and the summary gives TP=1's time over
   TP=2's per phase: where the ratio is won or lost.

Progress lines carry a timestamp. Results go to --json after every phase. --deadline (seconds
from the start) ends the timed runs early with partial figures (TP=1's run leaves room for
TP=2's start-up and an equal run) and skips what no longer fits;
a watchdog writes the JSON, dumps every thread's stack (the TP ranks' too) and exits 3 if the
process is still running 60 s past it (a hang). Exit 0: all phases ran; 1: a phase failed (error and
traceback in the JSON); 2: cut by the deadline.
"""
from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from w1 import build_model  # noqa: E402  (this folder's W1 script: the same model builder)

LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                   max_position_embeddings=131072, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192},
                   tie_word_embeddings=False)
TINY = dict(LLAMA_31_8B, vocab_size=12000, hidden_size=128, intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
START = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - START:6.1f}s] {message}",
          flush=True)


class Report:
    """The JSON result, rewritten after every phase so a cut run still leaves its figures."""

    def __init__(self, path: str | None):
        self.path = path
        self.data: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "phases": {}}
        self.lock = threading.Lock()

    def phase(self, name: str, value) -> None:
        with self.lock:
            self.data["phases"][name] = value
        self.write()

    def write(self) -> None:
        if self.path:
            with self.lock, open(self.path, "w") as f:
                json.dump(self.data, f, indent=1, default=str)


def remaining(args) -> float:
    return float("inf") if args.deadline is None else args.deadline - (time.monotonic() - START)


def start_watchdog(args, report: Report) -> None:
    """A hang must still leave a report: at deadline + 60 s, dump stacks, write, exit 3."""
    if args.deadline is None:
        return

    def fire() -> None:
        log("watchdog: still running 60 s past the deadline; dumping stacks and exiting")
        report.data["watchdog"] = "fired: the run hung past its deadline"
        report.write()
        faulthandler.dump_traceback(all_threads=True)
        for child in multiprocessing.active_children():      # the TP ranks print theirs
            log(f"watchdog: stacks of {child.name} (pid {child.pid}):")
            os.kill(child.pid, signal.SIGUSR1)
        time.sleep(3)
        os._exit(3)
    timer = threading.Timer(max(remaining(args) + 60, 1), fire)
    timer.daemon = True
    timer.start()


def environment(args) -> dict:
    info = {"torch": torch.__version__, "device": args.device}
    if args.device == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return info


def teacher_sequences(args, vocab: int) -> list[tuple[list[int], int]]:
    """(prefix, position) for --positions positions: 64 per random sequence, after 128 tokens."""
    rng = np.random.default_rng(1)
    per_sequence, context = 64, 128
    count = -(-args.positions // per_sequence)
    sequences = rng.integers(0, min(vocab, 10000), size=(count, context + per_sequence))
    return [(seq[:context + k].tolist(), context + k) for seq in sequences
            for k in range(per_sequence)][:args.positions]


def teacher_forced(llm, prefixes) -> dict:
    """Top-1 next token and its logprob and margin after each prefix."""
    from kvport import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=2)
    outputs = llm.generate([p for p, _ in prefixes], params, use_tqdm=False)
    top1, lp1, margin = [], [], []
    for o in outputs:
        entry = o.outputs[0].logprobs[0]
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)
        top1.append(ranked[0][0])
        lp1.append(ranked[0][1].logprob)
        margin.append(ranked[0][1].logprob - ranked[1][1].logprob)
    return {"top1": top1, "logprob": lp1, "margin": margin}


def throughput(llm, requests, limit_s: float) -> dict:
    """W1, timed; stops after `limit_s` seconds with what it has."""
    from kvport import SamplingParams
    engine = llm.engine
    llm.generate([requests[0][0]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                 use_tqdm=False)                                   # warm-up, not timed
    tokens_before, steps_before = engine.stats.num_generation_tokens, engine.stats.num_steps
    step = getattr(engine, "step_finished", engine.step)
    start = time.perf_counter()
    for prompt, n in requests:
        engine.add_request(None, prompt, SamplingParams(max_tokens=n, temperature=0,
                                                        ignore_eos=True))
    complete, last_print = True, start
    timeline = []                       # per step: end time, running and waiting requests
    while engine.has_unfinished_requests():
        step()
        now = time.perf_counter()
        timeline.append((now - start, len(engine.scheduler.running),
                         len(engine.scheduler.waiting)))
        if now - last_print > 10:
            log(f"  {engine.stats.num_generation_tokens - tokens_before} tokens in "
                f"{now - start:.0f} s")
            last_print = now
        if now - start > limit_s:
            complete = False
            engine.abort_all()
            break
    elapsed = time.perf_counter() - start
    generated = engine.stats.num_generation_tokens - tokens_before
    return {"complete": complete, "elapsed_s": elapsed, "output_tokens": generated,
            "requested_output_tokens": sum(n for _, n in requests),
            "steps": engine.stats.num_steps - steps_before,
            "output_tok_s": generated / elapsed, "num_kv_blocks": engine.num_blocks,
            "preemptions": engine.scheduler.num_preemptions,
            "async_scheduling": getattr(engine, "async_scheduling", False),
            "step_phases": step_phases(timeline)}


PHASE_BOUNDS = (1, 16, 64, 128, 192, 257)


def step_phases(timeline: list[tuple[float, int, int]]) -> dict:
    """Where the run's time went: the steps while prompts still wait (prefill chunks), then
    the decode steps by how many requests ran (W1's batch shrinks as requests finish)."""
    phases: dict = {}
    previous = 0.0
    for end, running, waiting in timeline:
        if waiting:
            name = "prompts waiting"
        else:
            low = max(b for b in PHASE_BOUNDS if b <= max(running, 1))
            high = min(b for b in PHASE_BOUNDS if b > max(running, 1))
            name = f"running {low}-{high - 1}"
        entry = phases.setdefault(name, {"steps": 0, "seconds": 0.0})
        entry["steps"] += 1
        entry["seconds"] += end - previous
        previous = end
    for entry in phases.values():
        entry["ms_per_step"] = 1e3 * entry["seconds"] / entry["steps"]
    return phases


def time_for_throughput(leave_room: bool, startup_s: float, args) -> float:
    """Seconds this engine's timed run may take: the first (TP=1) leaves room for TP=2's
    start-up (estimated from its own) and an equal run; the others take what is left."""
    left = remaining(args) - 15                     # shutdown and the summary
    if leave_room:
        left = (left - (1.5 * startup_s + 30)) / 2
    return left


def free_memory(args) -> list[str]:
    if args.device != "cuda":
        return []
    return [f"GPU{i} {torch.cuda.mem_get_info(i)[0] / 2**30:.1f} GiB free"
            for i in range(torch.cuda.device_count())]


def run_engine(tp: int, args, prefixes, requests, report: Report, eager: bool = False,
               sync: bool = False, nccl_only: bool = False,
               float32_reduce: bool = False, invariant: bool = False) -> dict | None:
    """Start an engine of `tp` ranks, teacher-force (unless `prefixes` is empty), then time
    W1. `sync`: without async scheduling. `nccl_only`: every all-reduce through NCCL (no
    symmetric memory). `float32_reduce`: tp_reduce_dtype float32. `invariant`: tp_invariant.
    None if it failed."""
    from kvport import LLM
    name = (f"tp{tp}" + ("_eager" if eager else "") + ("_sync" if sync else "")
            + ("_nccl" if nccl_only else "") + ("_f32reduce" if float32_reduce else "")
            + ("_invariant" if invariant else ""))
    result: dict = {"tensor_parallel_size": tp, "enforce_eager": eager,
                    "custom_all_reduce": not nccl_only,
                    "tp_reduce_dtype": "float32" if float32_reduce else "auto",
                    "tp_invariant": invariant}
    extra = {"async_scheduling": False} if sync else {}
    if invariant:
        extra["tp_invariant"] = True
    if nccl_only:
        extra["custom_all_reduce"] = False
    if float32_reduce:
        extra["tp_reduce_dtype"] = "float32"
    llm = None
    try:
        log(f"{name}: starting the engine ({', '.join(free_memory(args)) or args.device})")
        start = time.perf_counter()
        llm = LLM(args.model_dir, device=args.device, dtype=args.dtype, max_model_len=4096,
                  tensor_parallel_size=tp, max_num_seqs=256, max_num_batched_tokens=8192,
                  gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=eager,
                  **extra)
        result["startup_s"] = time.perf_counter() - start
        log(f"{name}: started in {result['startup_s']:.0f} s, {llm.engine.num_blocks} KV blocks")
        if prefixes:
            result["teacher"] = teacher_forced(llm, prefixes)
            log(f"{name}: teacher-forced {len(prefixes)} positions")
            if tp == 1 and args.tp1_self_check:
                again = teacher_forced(llm, prefixes[::-1])
                result["teacher_again"] = {k: v[::-1] for k, v in again.items()}
                log(f"{name}: teacher-forced again, in reverse order")
        report.phase(name, result)
        limit = time_for_throughput(tp == 1 and not (sync or invariant), result["startup_s"],
                                    args)
        if limit < 20:
            log(f"{name}: skipping throughput (deadline)")
            result["throughput"] = "skipped: deadline"
        else:
            log(f"{name}: W1 throughput, at most {limit:.0f} s")
            result["throughput"] = throughput(llm, requests, limit)
            log(f"{name}: {result['throughput']['output_tok_s']:.0f} output tok/s "
                f"(complete: {result['throughput']['complete']})")
    except Exception as exc:
        log(f"{name}: FAILED: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        result.update(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    finally:
        if llm is not None:
            llm.engine.shutdown()
        del llm
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    report.phase(name, result)
    return None if "error" in result else result


def agreement(one: dict, two: dict) -> dict:
    """TP=2 top-1 against TP=1's, everywhere and at the positions whose margin is decisive."""
    t1, t2 = np.array(one["top1"]), np.array(two["top1"])
    same = t1 == t2
    diff = np.array(one["logprob"]) - np.array(two["logprob"])
    noise = float(np.sqrt(np.mean(diff[same] ** 2))) if same.any() else float("nan")
    decisive = np.array(one["margin"]) > 4 * noise
    return {"positions": int(same.size), "top1_agreement": float(same.mean()),
            "top1_logprob_rms_difference": noise, "decisive_positions": int(decisive.sum()),
            "top1_agreement_decisive": float(same[decisive].mean()) if decisive.any() else None,
            "median_margin_where_they_differ": float(np.median(np.array(one["margin"])[~same]))
            if (~same).any() else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda; cpu only to check the script")
    p.add_argument("--tiny", action="store_true", help="a 2-layer stand-in of the same family")
    p.add_argument("--model-dir", default="/tmp/kvport-tp-llama8b")
    p.add_argument("--positions", type=int, default=384, help="teacher-forced positions")
    p.add_argument("--num-prompts", type=int, default=256, help="W1 requests")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--deadline", type=float, default=None, help="seconds for the whole run")
    p.add_argument("--tp1-sync", action="store_true",
                   help="finally, time TP=1 without async scheduling too, if time is left")
    p.add_argument("--tp1-self-check", action="store_true",
                   help="teacher-force TP=1 twice (the second time in reverse order, so other "
                        "batches, chunks and prefix-cache hits): TP=1's agreement with itself "
                        "is the noise floor TP=2's agreement is read against")
    p.add_argument("--tp2-float32-reduce", action="store_true",
                   help="then TP=2 again with tp_reduce_dtype float32 (teacher forcing and "
                        "throughput), if time is left")
    p.add_argument("--tp-invariant", action="store_true",
                   help="then TP=1 and TP=2 again with tp_invariant (teacher forcing and "
                        "throughput): their agreement (expected: every logit equal) and what "
                        "the mode costs, if time is left")
    p.add_argument("--tp2-nccl", action="store_true",
                   help="finally, time TP=2 with every all-reduce through NCCL too (no "
                        "symmetric memory), if time is left")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    report = Report(args.json)
    start_watchdog(args, report)
    report.data["environment"] = environment(args)
    log(f"environment: {json.dumps(report.data['environment'])}")

    from kvport.bench.prompts import random_token_requests
    config = TINY if args.tiny else LLAMA_31_8B
    log(f"building the random-weight model in {args.model_dir}")
    model = build_model(args.model_dir, config, args.device)
    del model
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    report.phase("build", {"config": config, "seconds": time.monotonic() - START})
    prefixes = teacher_sequences(args, config["vocab_size"])
    requests = random_token_requests(args.num_prompts, (100, 1024), (100, 1024), seed=0)

    one = run_engine(1, args, prefixes, requests, report)
    two = run_engine(2, args, prefixes, requests, report)
    if two is None and args.device == "cuda" and remaining(args) > 120:
        log("tp2 failed with CUDA graphs: trying once more with --enforce-eager, to tell a "
            "graph problem from a TP problem")
        two = run_engine(2, args, prefixes, requests, report, eager=True)
    code = summarize(one, two, report)
    if args.tp2_float32_reduce:
        float32_reduce_run(args, one, prefixes, requests, report)
    if args.tp_invariant:
        invariant_runs(args, one, prefixes, requests, report)
    if args.tp2_nccl:
        nccl_run(args, requests, report)
    if args.tp1_sync:
        extra_run(args, requests, report)
    return code


def float32_reduce_run(args, one: dict | None, prefixes, requests, report: Report) -> None:
    """TP=2 summing in float32: its agreement with TP=1 and its throughput."""
    if remaining(args) < 120:
        log("tp2_f32reduce: skipped (deadline)")
        return
    run = run_engine(2, args, prefixes, requests, report, float32_reduce=True)
    summary = report.data["phases"]["summary"]
    if run and one:
        summary["agreement_float32_reduce"] = agreement(one["teacher"], run["teacher"])
        if isinstance(run.get("throughput"), dict) and isinstance(one.get("throughput"), dict):
            summary["tp2_float32_reduce_over_tp1"] = (run["throughput"]["output_tok_s"]
                                                      / one["throughput"]["output_tok_s"])
        report.write()
        log("TP=2 float32 reduce: " + json.dumps({k: summary.get(k) for k in (
            "agreement_float32_reduce", "tp2_float32_reduce_over_tp1")}))


def invariant_runs(args, one: dict | None, prefixes, requests, report: Report) -> None:
    """TP=1 and TP=2 under tp_invariant: TP=2's agreement with TP=1 (both invariant), and
    each one's throughput against the default TP=1's."""
    runs = {}
    for tp in (1, 2):
        if remaining(args) < 150:
            log(f"tp{tp}_invariant: skipped (deadline)")
            return
        runs[tp] = run_engine(tp, args, prefixes, requests, report, invariant=True)
    summary = report.data["phases"]["summary"]
    if runs[1] and runs[2]:
        summary["agreement_invariant"] = agreement(runs[1]["teacher"], runs[2]["teacher"])
        summary["invariant_logprobs_equal"] = runs[1]["teacher"] == runs[2]["teacher"]
    for tp, run in runs.items():
        if run and one and isinstance(run.get("throughput"), dict) and \
                isinstance(one.get("throughput"), dict):
            summary[f"tp{tp}_invariant_over_tp1"] = (run["throughput"]["output_tok_s"]
                                                     / one["throughput"]["output_tok_s"])
    report.write()
    log("tp_invariant: " + json.dumps({k: v for k, v in summary.items()
                                       if "invariant" in k}))


def nccl_run(args, requests, report: Report) -> None:
    """TP=2 with NCCL for every all-reduce: what the symmetric-memory all-reduce gains."""
    tp2_against(args, requests, report, "tp2_nccl", "tp2_symmetric_over_tp2_nccl",
                "TP=2 symmetric-memory all-reduce / NCCL only", tp=2, nccl_only=True)


def extra_run(args, requests, report: Report) -> None:
    """TP=1 without async scheduling, the baseline of the session-3 figures (reported
    beside, not instead)."""
    tp2_against(args, requests, report, "tp1_sync", "tp2_over_tp1_sync",
                "TP=2 / TP=1 without async scheduling", tp=1, sync=True)


def tp2_against(args, requests, report: Report, name: str, key: str, label: str, tp: int,
                **variant) -> None:
    """One more engine (`variant` of run_engine), W1 only; TP=2's throughput over it goes to
    the summary under `key`."""
    if remaining(args) < 150:
        log(f"{name}: skipped (deadline)")
        return
    other = run_engine(tp, args, [], requests, report, **variant)
    two = report.data["phases"].get("tp2") or {}
    if other and isinstance(other.get("throughput"), dict) and \
            isinstance(two.get("throughput"), dict):
        ratio = two["throughput"]["output_tok_s"] / other["throughput"]["output_tok_s"]
        report.data["phases"]["summary"][key] = ratio
        report.write()
        log(f"{label}: {ratio:.3f}x")


def summarize(one: dict | None, two: dict | None, report: Report) -> int:
    summary: dict = {}
    if one and "teacher_again" in one:
        summary["tp1_agreement_with_itself"] = agreement(one["teacher"], one["teacher_again"])
    if one and two:
        summary["agreement"] = agreement(one["teacher"], two["teacher"])
        t1, t2 = one.get("throughput"), two.get("throughput")
        if isinstance(t1, dict) and isinstance(t2, dict):
            summary["tp1_output_tok_s"] = t1["output_tok_s"]
            summary["tp2_output_tok_s"] = t2["output_tok_s"]
            summary["tp2_over_tp1"] = t2["output_tok_s"] / t1["output_tok_s"]
            summary["both_complete"] = t1["complete"] and t2["complete"]
            summary["phase_seconds_tp1_over_tp2"] = {
                name: round(t1["step_phases"][name]["seconds"] / phase["seconds"], 3)
                for name, phase in t2["step_phases"].items()
                if name in t1["step_phases"] and phase["seconds"] > 0}
    report.phase("summary", summary)
    log("TP summary: " + json.dumps(summary))
    if not (one and two):
        return 1
    complete = all(isinstance(r.get("throughput"), dict) and r["throughput"]["complete"]
                   for r in (one, two))
    return 0 if complete else 2


if __name__ == "__main__":
    sys.exit(main())
