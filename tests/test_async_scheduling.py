"""Async scheduling (step N+1 launched before step N's output is processed) on the CPU worker.

The CPU worker does not prefer it (nothing to overlap on the host), but runs it for real when
asked: its runner keeps each step's sampled ids as a tensor, puts placeholders in its request
state, and fills the next step's inputs from that tensor, exactly as the CUDA runner does on
the GPU. So the scheduler's pending tokens, the engine's one-step-late output processing and
the runner's placeholder inputs are all tested here: every result must equal the
synchronous engine's, and nothing may leak.
"""
import pytest

from kvport import LLM, SamplingParams
from kvport.core.request import RequestStatus

PROMPTS = [[(5 * i + j * j) % 300 + 3 for j in range(4 + 9 * i)] for i in range(8)]


def make_llm(path, async_scheduling, **kw):
    kw.setdefault("num_blocks", 256)
    kw.setdefault("max_model_len", 1024)
    return LLM(path, device="cpu", dtype="float32", async_scheduling=async_scheduling, **kw)


def token_ids(outputs):
    return [[c.token_ids for c in o.outputs] for o in outputs]


def assert_clean(llm):
    engine = llm.engine
    pool = engine.kv_cache.pool
    assert pool.num_free_blocks == pool.num_blocks
    assert not engine.scheduler.has_unfinished_requests()
    assert engine.worker.runner.states == {} or all(
        r not in engine.scheduler.requests for r in engine.worker.runner.states)


@pytest.fixture(scope="module")
def pair(tiny_llama_dir):
    return make_llm(tiny_llama_dir, False), make_llm(tiny_llama_dir, True)


def test_defaults_follow_the_worker(tiny_llama_dir, pair):
    sync_llm, async_llm = pair
    assert not sync_llm.engine.async_scheduling and async_llm.engine.async_scheduling
    assert not make_llm(tiny_llama_dir, None).engine.async_scheduling   # the CPU's preference


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
    SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=17, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=15, repetition_penalty=1.3,
                   presence_penalty=0.5, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=12, logprobs=3, ignore_eos=True),
    SamplingParams(temperature=1.0, n=3, seed=11, max_tokens=9, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=30, min_tokens=4),          # may stop on EOS
], ids=["greedy", "seeded", "penalties", "logprobs", "n3", "eos"])
def test_same_outputs_as_synchronous(pair, params):
    sync_llm, async_llm = pair
    expected = sync_llm.generate(PROMPTS, params, use_tqdm=False)
    got = async_llm.generate(PROMPTS, params, use_tqdm=False)
    assert token_ids(got) == token_ids(expected)
    assert [[c.text for c in o.outputs] for o in got] == \
        [[c.text for c in o.outputs] for o in expected]
    assert [[c.finish_reason for c in o.outputs] for o in got] == \
        [[c.finish_reason for c in o.outputs] for o in expected]
    if params.logprobs:
        assert [[c.logprobs for c in o.outputs] for o in got] == \
            [[c.logprobs for c in o.outputs] for o in expected]
    assert_clean(async_llm)


def test_stop_strings_end_one_step_late_without_leaking(pair):
    sync_llm, async_llm = pair
    text = sync_llm.generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=24,
                                                        ignore_eos=True))[0].outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    expected = sync_llm.generate(PROMPTS, params, use_tqdm=False)
    got = async_llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in expected]
    assert any(o.outputs[0].stop_reason == stop for o in got)
    assert_clean(async_llm)


def assert_tight_cache_matches(model_dir, sync_llm, params, max_num_batched_tokens: int):
    """An async engine with a 12-block cache (so it preempts) and chunked prefill gives the
    synchronous engine's tokens and leaves no state behind."""
    expected = sync_llm.generate(PROMPTS, params, use_tqdm=False)
    tight = make_llm(model_dir, True, num_blocks=12, block_size=16, max_model_len=192,
                     max_num_batched_tokens=max_num_batched_tokens)
    got = tight.generate(PROMPTS, params, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    assert token_ids(got) == token_ids(expected)
    assert_clean(tight)


def test_chunked_prefill_and_preemption(tiny_llama_dir, pair):
    sync_llm, _ = pair
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    assert_tight_cache_matches(tiny_llama_dir, sync_llm, params, max_num_batched_tokens=7)


def test_prefix_caching_with_pending_tokens(tiny_llama_dir):
    """Blocks that a pending token completes are cached only once the token is known: a
    second pass over the same prompts hits the cache and changes nothing."""
    llm = make_llm(tiny_llama_dir, True, block_size=4)
    shared = [PROMPTS[7][:30] + p for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=13, ignore_eos=True)
    first = llm.generate(shared, params, use_tqdm=False)
    second = llm.generate(shared, params, use_tqdm=False)
    assert token_ids(first) == token_ids(second)
    assert all(o.num_cached_tokens >= 28 for o in second)
    assert_clean(llm)


def test_abort_while_a_step_is_in_flight(pair):
    _, llm = pair
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    ids = [engine.add_request(None, p, params) for p in PROMPTS[:4]]
    for _ in range(6):
        engine.step()
    assert engine._in_flight is not None          # a launched step nobody has read yet
    pending = [r for r in engine.scheduler.running if r.num_pending_tokens]
    assert pending, "requests should have a sampled token the engine has not seen"
    for request_id in ids[:2]:
        assert engine.abort(request_id)
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert output.request_id in ids[2:]
    engine.step()                                   # hands the freed ids to the worker
    assert_clean(llm)
    assert all(r.status != RequestStatus.RUNNING for r in pending)


def test_mixed_sampling_in_one_batch_under_preemption(tiny_llama_dir, pair):
    """Penalties on some rows make the sampler read every row's output ids: a row whose last
    id is still pending must be resolved first (this once sent -1 into the penalty count)."""
    sync_llm, _ = pair
    params = [SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0.9, seed=7, ignore_eos=True),
              SamplingParams(max_tokens=20, temperature=0.0, repetition_penalty=1.2,
                             ignore_eos=True),
              SamplingParams(max_tokens=25, temperature=0.0, logprobs=2, ignore_eos=True)]
    per_prompt = [params[i % 4] for i in range(len(PROMPTS))]
    assert_tight_cache_matches(tiny_llama_dir, sync_llm, per_prompt, max_num_batched_tokens=32)


@pytest.mark.parametrize("flags, expected", [([], None), (["--async-scheduling"], True),
                                             (["--no-async-scheduling"], False)])
def test_cli_flag_reaches_the_config(flags, expected):
    from kvport.api.cli import build_parser, engine_config_from_args
    args = build_parser().parse_args(["serve", *flags])
    assert engine_config_from_args(args).scheduler.async_scheduling is expected
