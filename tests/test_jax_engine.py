"""The engine end to end through kvport-tpu's JAX worker on JAX's CPU backend (`--device xla`).

The same checks tests/test_engine.py makes of the torch worker, on the same tiny random
models and prompts: greedy equality with transformers (one by one, batched, chunked, across
preemption, with prefix caching on and off), abort, seeds, logprobs, the other families;
then what is particular to JAX: a bounded number of compilations for a mixed workload, the
Pallas kernel inside the model, and the `--device tpu` error without a TPU.
"""
from __future__ import annotations

import random

import jax
import pytest
import torch

from kvport import LLM, SamplingParams
from test_engine import PROMPTS, assert_pool_full, greedy, hf_greedy  # noqa: F401 (fixture)

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def make_llm(path, **kw):
    kw.setdefault("num_blocks", 256)
    kw.setdefault("max_model_len", 1024)
    return LLM(path, device="xla", dtype="float32", **kw)


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return make_llm(tiny_llama_dir)


def test_runs_on_the_jax_worker(llm):
    from kvport_tpu.worker import JaxWorker
    assert isinstance(llm.engine.worker, JaxWorker)
    assert llm.engine.platform.name == "xla" and jax.default_backend() == "cpu"
    assert type(llm.engine.worker.attn_backend).name == "jax_ragged"


def test_greedy_matches_transformers_one_by_one_and_batched(llm, hf_greedy):
    one_by_one = [llm.generate(p, greedy(), use_tqdm=False)[0].outputs[0].token_ids
                  for p in PROMPTS]
    assert one_by_one == hf_greedy
    assert token_ids(llm.generate(PROMPTS, greedy(), use_tqdm=False)) == hf_greedy
    assert_pool_full(llm)


def test_prefix_caching_hits_and_changes_nothing(tiny_llama_dir):
    llm = make_llm(tiny_llama_dir, block_size=4)
    shared = [p[:3] + PROMPTS[7][:40] + p for p in PROMPTS]
    first = llm.generate(shared, greedy(), use_tqdm=False)
    second = llm.generate(shared, greedy(), use_tqdm=False)
    assert token_ids(first) == token_ids(second)
    assert all(o.num_cached_tokens >= 40 for o in second)
    off = make_llm(tiny_llama_dir, block_size=4, enable_prefix_caching=False)
    assert token_ids(off.generate(shared, greedy(), use_tqdm=False)) == token_ids(first)
    assert off.engine.kv_cache.pool.num_cached_blocks == 0
    assert_pool_full(llm)


def test_preemption_gives_identical_tokens(tiny_llama_dir, hf_greedy):
    llm = make_llm(tiny_llama_dir, num_blocks=12, block_size=16, max_model_len=192)
    outputs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert token_ids(outputs) == hf_greedy
    assert_pool_full(llm)


def test_chunked_prefill_gives_identical_tokens(tiny_llama_dir, hf_greedy):
    llm = make_llm(tiny_llama_dir, max_num_batched_tokens=7, max_num_seqs=3)
    assert token_ids(llm.generate(PROMPTS, greedy(), use_tqdm=False)) == hf_greedy


def test_abort_frees_every_block(llm):
    engine = llm.engine
    ids = [engine.add_request(None, p, greedy(max_tokens=50)) for p in PROMPTS]
    for _ in range(5):
        engine.step()
    assert engine.kv_cache.pool.num_used_blocks > 0
    for request_id in ids:
        assert engine.abort(request_id)
    assert not engine.abort(ids[0])
    engine.step()
    assert_pool_full(llm)
    assert not engine.worker.runner.states   # the worker dropped their state too


def test_seeded_sampling_is_reproducible_in_any_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(PROMPTS[2], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=16) for _ in PROMPTS]
    mixed = llm.generate(PROMPTS[:2] + [PROMPTS[2]] + PROMPTS[3:],
                         others[:2] + [params] + others[3:], use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16,
                                ignore_eos=True)
    assert llm.generate(PROMPTS[2], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_logprobs_match_the_torch_worker(llm, tiny_llama_dir):
    params = greedy(max_tokens=6, logprobs=3)
    ours = llm.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs[0]
    theirs = LLM(tiny_llama_dir, device="cpu", dtype="float32", num_blocks=64,
                 max_model_len=256).generate(PROMPTS[1], params, use_tqdm=False)[0].outputs[0]
    assert ours.token_ids == theirs.token_ids
    for mine, ref in zip(ours.logprobs, theirs.logprobs):
        assert set(mine) == set(ref)
        for token_id, entry in mine.items():
            assert entry.rank == ref[token_id].rank
            assert entry.logprob == pytest.approx(ref[token_id].logprob, abs=1e-4)
    assert ours.cumulative_logprob == pytest.approx(theirs.cumulative_logprob, abs=1e-3)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_other_families_match_transformers(family, tmp_path):
    """Tiny random Qwen2 (qkv bias), Qwen3 (q/k norm) and Mistral (sliding window 8)."""
    from transformers import AutoModelForCausalLM

    from conftest import build_tiny_model
    extra = {"sliding_window": 8} if family == "mistral" else {}
    path = build_tiny_model(str(tmp_path / family), family, seed=3, **extra)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    expected = [model.generate(torch.tensor([p]), max_new_tokens=16, min_new_tokens=16,
                               do_sample=False, pad_token_id=0)[0, len(p):].tolist()
                for p in PROMPTS[:4]]
    llm = make_llm(path)
    assert token_ids(llm.generate(PROMPTS[:4], greedy(max_tokens=16), use_tqdm=False)) == expected


def _mixed_params(rng: random.Random) -> SamplingParams:
    kind = rng.randrange(5)
    max_tokens = rng.randrange(1, 40)
    if kind == 0:
        return greedy(max_tokens=max_tokens)
    if kind == 1:
        return SamplingParams(temperature=0.8, top_p=0.9, max_tokens=max_tokens, ignore_eos=True,
                              seed=rng.randrange(1000))
    if kind == 2:
        return SamplingParams(temperature=1.0, top_k=20, max_tokens=max_tokens, ignore_eos=True)
    if kind == 3:
        return SamplingParams(temperature=0, logprobs=2, max_tokens=max_tokens, ignore_eos=True)
    return SamplingParams(temperature=0.7, repetition_penalty=1.2, presence_penalty=0.3,
                          min_p=0.05, max_tokens=max_tokens, ignore_eos=True)


def test_compilations_for_100_mixed_requests_are_bounded(tiny_llama_dir, record_property):
    """100 requests of 3-300 prompt tokens and 1-39 output tokens, five kinds of sampling,
    arriving in waves while others run: the step compiles once per bucketed shape."""
    llm = make_llm(tiny_llama_dir, num_blocks=512, max_model_len=512, max_num_seqs=32,
                   max_num_batched_tokens=256)
    engine, runner = llm.engine, llm.engine.worker.runner
    compiles = []

    def listener(event, duration, **_):
        if event == BACKEND_COMPILE_EVENT:
            compiles.append(duration)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        rng = random.Random(0)
        pending = [([rng.randrange(3, 300) for _ in range(rng.randrange(3, 300))],
                    _mixed_params(rng)) for _ in range(100)]
        finished = {}
        while pending or engine.has_unfinished_requests():
            for _ in range(min(rng.randrange(0, 12), len(pending))):
                prompt, params = pending.pop()
                engine.add_request(None, prompt, params)
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(finished) == 100
    log, buckets = runner.compile_log, runner.buckets
    step_shapes, sampler_keys = len(log.step_shapes), len(log.sampler_keys)
    summary = (f"{step_shapes} step shapes (bound {buckets.max_shapes()}) + {sampler_keys} "
               f"sampler variants = {log.total} jitted compilations; {len(compiles)} XLA "
               f"backend compilations, {sum(compiles):.1f} s; {engine.stats.num_steps} steps")
    print("\n" + summary)
    record_property("compilations", summary)
    assert step_shapes <= buckets.max_shapes()
    assert log.total <= 40, summary
    # Every XLA compilation during the workload is one the log accounts for (the sampler's
    # jit is shared by all runners in this process, so an earlier test may have compiled some).
    assert len(compiles) <= log.total, summary
    assert_pool_full(llm)


def test_precompiled_decode_shapes_serve_the_decode_steps(tiny_llama_dir, hf_greedy):
    llm = make_llm(tiny_llama_dir, max_num_seqs=8, max_model_len=128, num_blocks=64)
    runner = llm.engine.worker.runner
    shapes = runner.buckets.decode_shapes()
    runner.precompile(shapes, max_workers=2)
    assert runner.compile_log.step_shapes == set(shapes)
    assert token_ids(llm.generate(PROMPTS[:2], greedy(max_tokens=5), use_tqdm=False)) == \
        [hf_greedy[0][:5], hf_greedy[1][:5]]
    # only the prompt step compiled anew; the four decode steps ran precompiled code
    assert [s.num_prefill_tiles > 0 for s in runner.compile_log.step_shapes - set(shapes)] \
        == [True]


def test_pallas_kernel_serves_through_the_engine(tiny_llama_dir, hf_greedy):
    """attention_backend="pallas_ragged": the TPU kernel, interpreted on this CPU, inside
    the jitted model step (few tokens: interpretation is slow)."""
    llm = make_llm(tiny_llama_dir, attention_backend="pallas_ragged", max_model_len=64,
                   max_num_seqs=2, num_blocks=16)
    prompts = [PROMPTS[0], PROMPTS[3]]
    out = token_ids(llm.generate(prompts, greedy(max_tokens=3), use_tqdm=False))
    assert out == [hf_greedy[0][:3], hf_greedy[3][:3]]


def test_device_tpu_without_a_tpu_names_the_xla_platform(tiny_llama_dir):
    from kvport.platforms.registry import PlatformSelectionError
    with pytest.raises(PlatformSelectionError) as info:
        LLM(tiny_llama_dir, device="tpu")
    message = str(info.value)
    assert "no TPU found" in message and "--device xla" in message
    assert "torch-xla is not supported" in message


def test_torch_attention_backend_is_refused_by_the_jax_worker(tiny_llama_dir):
    from kvport.attention_backends.interface import UnsupportedAttentionConfig
    with pytest.raises(UnsupportedAttentionConfig, match="jax_ragged or pallas_ragged"):
        make_llm(tiny_llama_dir, attention_backend="torch_reference")
