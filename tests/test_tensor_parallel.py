"""Tensor parallelism end to end on the CPU plugin: real worker processes, real gloo collectives.

* TP=2 gives the same greedy tokens as TP=1 on SmolLM2-135M-Instruct in float32, several
  prompts batched. SmolLM2 has 9 attention heads over 3 KV heads: rank 0 holds two KV-head
  groups and rank 1 one (kvport/core/tensor_parallel.py).
* A TP worker killed with SIGKILL ends the engine: the next step raises WorkerDiedError
  naming the rank and the signal, within seconds, and no worker process is left.
* Sizes the model cannot be split into, and int8 with TP, are ConfigErrors before any
  process starts.
* `kvport serve --tensor-parallel-size 2` answers a completion with TP=1's text.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import time

import httpx
import pytest

from kvport import LLM, SamplingParams
from kvport.core.config import ConfigError
from kvport.core.executor import MultiprocExecutor, WorkerDiedError

from server_fixtures import ServerProcess

TINY = dict(device="cpu", dtype="float32", max_model_len=256, num_blocks=64)


def _greedy(max_tokens: int, **extra) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **extra)


def _tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _assert_all_ended(executor: MultiprocExecutor) -> None:
    for process in executor.processes:
        process.join(10)
        assert process.exitcode is not None, f"rank process {process.pid} is still running"


@pytest.mark.slow
def test_tp2_matches_tp1_on_smollm2(smollm2_path):
    chats = ["What is the capital of France?", "Write a short poem about the moon.",
             "Give me three tips for learning Python."]
    raw = ["def fibonacci(n):", "The three primary colors are",
           "List of prime numbers: 2, 3, 5, 7,"]
    params = _greedy(24)
    one = LLM(smollm2_path, device="cpu", dtype="float32", max_model_len=512,
              kv_cache_memory="32MiB", num_threads=1)
    prompts = raw + [one.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in chats]
    expected = _tokens(one, prompts, params)
    one.engine.shutdown()
    del one
    two = LLM(smollm2_path, device="cpu", dtype="float32", max_model_len=512,
              kv_cache_memory="32MiB", num_threads=2, tensor_parallel_size=2)
    try:
        assert isinstance(two.engine.worker, MultiprocExecutor)
        assert _tokens(two, prompts, params) == expected
    finally:
        two.engine.shutdown()
    _assert_all_ended(two.engine.worker)


def test_async_steps_through_the_executor_match_tp1(tiny_llama_dir):
    """Async scheduling with TP=2: each rank launches step N+1 before finishing step N, rank 0
    answers each launch with the previous step's output, and the ranks feed pending tokens
    from their own (broadcast) sampled ids. Greedy, seeded, penalty and stop-string requests
    in one batch under preemption must give TP=1's synchronous results."""
    prompts = [[(7 * i + j * j) % 300 + 3 for j in range(5 + 9 * i)] for i in range(6)]
    params = [_greedy(20, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=5, max_tokens=16, ignore_eos=True),
              _greedy(12, repetition_penalty=1.3, ignore_eos=True)]
    per_prompt = [params[i % 3] for i in range(len(prompts))]
    small = dict(TINY, num_blocks=10, block_size=16, max_model_len=128)
    one = LLM(tiny_llama_dir, async_scheduling=False, **small)
    expected = _tokens(one, prompts, per_prompt)
    one.engine.shutdown()
    two = LLM(tiny_llama_dir, tensor_parallel_size=2, async_scheduling=True, **small)
    try:
        assert two.engine.async_scheduling
        assert _tokens(two, prompts, per_prompt) == expected
        assert two.engine.scheduler.num_preemptions > 0
        pool = two.engine.kv_cache.pool
        assert pool.num_free_blocks == pool.num_blocks
        assert _tokens(two, prompts[:2], _greedy(6)) == _tokens(two, prompts[:2], _greedy(6))
    finally:
        two.engine.shutdown()
    _assert_all_ended(two.engine.worker)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_killed_worker_ends_the_engine_with_a_clear_error(tiny_llama_dir, async_scheduling):
    llm = LLM(tiny_llama_dir, tensor_parallel_size=2, async_scheduling=async_scheduling,
              **TINY)
    executor = llm.engine.worker
    try:
        assert len(_tokens(llm, [[5, 6, 7]], _greedy(4, ignore_eos=True))[0]) == 4
        os.kill(executor.pids[1], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match=r"rank 1 \(pid \d+\) was killed by SIGKILL"):
            llm.generate([[5, 6, 7]], _greedy(4), use_tqdm=False)
        assert time.monotonic() - start < 30
        _assert_all_ended(executor)
        with pytest.raises(WorkerDiedError):         # and it stays down
            llm.generate([[8, 9]], _greedy(2), use_tqdm=False)
    finally:
        llm.engine.shutdown()


def test_sizes_the_model_cannot_take_are_refused_before_starting(tiny_llama_dir):
    with pytest.raises(ConfigError, match=r"tensor_parallel_size 4 is larger than the model's "
                                          r"2 KV heads"):
        LLM(tiny_llama_dir, tensor_parallel_size=4, **TINY)
    with pytest.raises(ConfigError, match=r"quantization int8 cannot be combined with "
                                          r"tensor_parallel_size 2"):
        LLM(tiny_llama_dir, tensor_parallel_size=2, quantization="int8", **TINY)
    with pytest.raises(ConfigError, match="tensor_parallel_size must be >= 1, got 0"):
        LLM(tiny_llama_dir, tensor_parallel_size=0, **TINY)
    assert not multiprocessing.active_children()


def test_serve_with_tensor_parallel_size_2(tiny_llama_dir):
    prompt = [3, 17, 29, 41]
    one = LLM(tiny_llama_dir, **TINY)
    expected = one.generate([prompt], _greedy(8, ignore_eos=True), use_tqdm=False)[0]
    one.engine.shutdown()
    server = ServerProcess(tiny_llama_dir, "--tensor-parallel-size", "2", "--dtype", "float32",
                           "--max-model-len", "256", "--num-blocks", "64")
    try:
        reply = httpx.post(server.url + "/v1/completions", timeout=60, json={
            "model": os.path.basename(tiny_llama_dir), "prompt": prompt, "max_tokens": 8,
            "temperature": 0, "ignore_eos": True})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == expected.outputs[0].text
    finally:
        server.stop()
    assert server.process.returncode == 0, server.output()
