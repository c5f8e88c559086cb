"""kvport-tpu's JAX worker on a GPU (`--device xla`, jax with CUDA): parity and W1 throughput.

    python plugins/kvport-tpu/bench/gpu_check.py parity --json OUT   # greedy vs transformers
    python plugins/kvport-tpu/bench/gpu_check.py build DIR           # W1's random Llama-1B
    python plugins/kvport-tpu/bench/gpu_check.py w1 DIR --json OUT   # W1 through the JAX worker

parity: the tests' tiny random Llama and Qwen3 (tests/conftest.py), 8 prompts batched,
greedy, float32, JAX on the GPU against transformers float32 on the GPU.
build: a random-weight Llama-3.2-1B-shaped model in bf16 (seed 0, transformers' init) with a
word-level tokenizer whose token i is "t<i>", saved as a Hugging Face directory.
w1: W1 (256 requests, prompt and output lengths uniform in [100, 1024], token ids in
[0, 10000], seed 0, ignore_eos) timed by kvport's own bench code; the compile counts and
times are reported beside the throughput. Run `kvport bench throughput --device cuda` on
the same directory for kvport-cuda's figure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=True)
# A stand-in of the same family for trying this script without a GPU (`build --tiny`).
TINY = dict(LLAMA_1B, vocab_size=12000, hidden_size=128, intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


def write_json(path: str | None, result: dict) -> None:
    print(json.dumps(result, indent=1), flush=True)
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def run_parity(args) -> int:
    import jax
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, os.path.join(REPO, "tests"))
    from conftest import build_tiny_model

    from kvport import LLM, SamplingParams
    prompts = [[(7 * i + j * j) % 300 + 3 for j in range(5 + 11 * i)] for i in range(8)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"jax_backend": jax.default_backend(), "device": str(jax.devices()[0]),
              "transformers_device": device, "families": {}}
    for family in ("llama", "qwen3"):
        path = build_tiny_model(f"/tmp/kvport-tiny-{family}", family, seed=3)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
        expected = [model.generate(torch.tensor([p], device=device), max_new_tokens=24,
                                   min_new_tokens=24, do_sample=False,
                                   pad_token_id=0)[0, len(p):].tolist() for p in prompts]
        llm = LLM(path, device="xla", dtype="float32", num_blocks=256, max_model_len=1024)
        params = SamplingParams(temperature=0, max_tokens=24, min_tokens=24)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        result["families"][family] = {
            "identical": got == expected,
            "matching_tokens": sum(a == b for g, e in zip(got, expected) for a, b in zip(g, e)),
            "tokens": sum(map(len, expected))}
    write_json(args.json, result)
    return 0 if all(f["identical"] for f in result["families"].values()) else 1


def run_build(args) -> int:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = TINY if args.tiny else LLAMA_1B
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16)
    model.save_pretrained(args.dir)
    vocab = config["vocab_size"]
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1",
                            bos_token="t2").save_pretrained(args.dir)
    return 0


def run_w1(args) -> int:
    """W1 through the JAX worker. Progress is printed as it happens (so a run cut short still
    says where its time went), and --deadline stops the timed run early, reporting the tokens
    generated so far."""
    import jax

    from kvport import LLM, SamplingParams
    from kvport.bench.prompts import random_token_requests
    compiles: list[float] = []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)
    jax.monitoring.register_event_duration_secs_listener(listener)
    start = time.perf_counter()
    llm = LLM(args.dir, device="xla", dtype="bfloat16", max_model_len=2048,
              max_num_seqs=256, max_num_batched_tokens=2048)
    engine, runner = llm.engine, llm.engine.worker.runner
    result = {"device": str(jax.devices()[0]), "jax": jax.__version__,
              "num_blocks": engine.num_blocks,
              "startup_s (load + precompiled decode shapes)": time.perf_counter() - start,
              "precompiled_decode_shapes": len(runner.compile_log.step_shapes),
              "compile_s_at_startup": sum(compiles)}
    print(json.dumps(result), flush=True)
    requests = random_token_requests(args.num_prompts, (100, 1024), (100, 1024), seed=0)
    llm.generate([requests[0][0]], SamplingParams(max_tokens=4, temperature=0,
                                                  ignore_eos=True), use_tqdm=False)
    compiles.clear()
    tokens_before = engine.stats.num_generation_tokens
    start = time.perf_counter()
    for prompt, n in requests:
        engine.add_request(None, prompt, SamplingParams(max_tokens=n, temperature=0,
                                                        ignore_eos=True))
    steps, complete = 0, True
    while engine.has_unfinished_requests():
        engine.step_finished()          # as LLM.generate: no per-step outputs are built
        steps += 1
        if steps % 100 == 0:
            print(f"step {steps}: {time.perf_counter() - start:.1f} s, "
                  f"{engine.stats.num_generation_tokens - tokens_before} tokens, "
                  f"{len(compiles)} compiles "
                  f"({sum(compiles):.1f} s)", flush=True)
        if args.deadline and time.perf_counter() - start > args.deadline:
            complete = False
            break
    elapsed = time.perf_counter() - start
    generated = engine.stats.num_generation_tokens - tokens_before
    result.update({
        "num_requests": len(requests), "complete": complete, "elapsed_s": elapsed,
        "output_tokens": generated, "output_throughput": generated / elapsed,
        "compiles_during_run": len(compiles), "compile_s_during_run": sum(compiles),
        "output_throughput_without_compiles": generated / (elapsed - sum(compiles)),
        "step_shapes_compiled_total": len(runner.compile_log.step_shapes),
        "sampler_variants": len(runner.compile_log.sampler_keys),
        "shape_bound": runner.buckets.max_shapes(), "steps": steps})
    write_json(args.json, result)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    parity = commands.add_parser("parity")
    parity.add_argument("--json")
    parity.set_defaults(func=run_parity)
    build = commands.add_parser("build")
    build.add_argument("dir")
    build.add_argument("--tiny", action="store_true", help="a 2-layer stand-in (no GPU needed)")
    build.set_defaults(func=run_build)
    w1 = commands.add_parser("w1")
    w1.add_argument("dir")
    w1.add_argument("--num-prompts", type=int, default=256)
    w1.add_argument("--deadline", type=float, default=None,
                    help="stop the timed run after this many seconds (partial figures)")
    w1.add_argument("--json")
    w1.set_defaults(func=run_w1)
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
