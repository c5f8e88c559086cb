"""The engine end to end on a tiny random model through the CPU plugin.

Greedy equality with transformers, prefix caching, preemption, abort, n samples sharing a
prompt, seeded sampling, logprobs, KV waste, and bad input that must leak nothing.
"""
import random

import pytest
import torch

from kvport import LLM, SamplingParams
from kvport.core.config import ConfigError
from kvport.core.sampling_params import InvalidRequestError

PROMPTS = [[(7 * i + j * j) % 300 + 3 for j in range(5 + 11 * i)] for i in range(8)]


@pytest.fixture(scope="module")
def hf_greedy(tiny_llama_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    outputs = []
    for prompt in PROMPTS:
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                             min_new_tokens=24, pad_token_id=0)
        outputs.append(ids[0, len(prompt):].tolist())
    return outputs


def make_llm(path, **kw):
    kw.setdefault("num_blocks", 256)
    kw.setdefault("max_model_len", 1024)
    return LLM(path, device="cpu", dtype="float32", **kw)


def greedy(max_tokens=24, **kw):
    """Greedy for exactly max_tokens tokens: EOS masked until then, as transformers'
    min_new_tokens does, so both sides pick among the same tokens."""
    return SamplingParams(temperature=0, max_tokens=max_tokens, min_tokens=max_tokens, **kw)


def assert_pool_full(llm):
    pool = llm.engine.kv_cache.pool
    assert pool.num_free_blocks == pool.num_blocks
    assert not llm.engine.scheduler.has_unfinished_requests()


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return make_llm(tiny_llama_dir)


def test_greedy_matches_transformers_one_by_one_and_batched(llm, hf_greedy):
    one_by_one = [llm.generate(p, greedy(), use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    batched = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy())]
    assert one_by_one == hf_greedy
    assert batched == hf_greedy
    assert_pool_full(llm)


def test_prefix_caching_hits_and_changes_nothing(tiny_llama_dir, hf_greedy):
    llm = make_llm(tiny_llama_dir, block_size=4)
    shared = [p[:3] + PROMPTS[7][:40] + p for p in PROMPTS]
    first = llm.generate(shared, greedy())
    second = llm.generate(shared, greedy())
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in second]
    assert all(o.num_cached_tokens >= 40 for o in second)
    off = make_llm(tiny_llama_dir, block_size=4, enable_prefix_caching=False)
    assert [o.outputs[0].token_ids for o in off.generate(shared, greedy())] == \
        [o.outputs[0].token_ids for o in first]
    assert all(o.num_cached_tokens == 0 for o in off.generate(shared, greedy()))
    assert_pool_full(llm)


def test_preemption_gives_identical_tokens(tiny_llama_dir, hf_greedy):
    llm = make_llm(tiny_llama_dir, num_blocks=12, block_size=16, max_model_len=192)
    outputs = llm.generate(PROMPTS, greedy())
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy
    assert_pool_full(llm)


def test_chunked_prefill_gives_identical_tokens(tiny_llama_dir, hf_greedy):
    llm = make_llm(tiny_llama_dir, max_num_batched_tokens=7, max_num_seqs=3)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy())] == hf_greedy


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
    assert not llm.engine.worker.runner.states   # the worker dropped their state too


def test_n_samples_share_prompt_blocks(tiny_llama_dir):
    llm = make_llm(tiny_llama_dir, block_size=4, enable_prefix_caching=False)
    engine = llm.engine
    prompt = PROMPTS[6]
    engine.add_request("g", prompt, SamplingParams(n=4, seed=3, max_tokens=10, ignore_eos=True))
    shared_refs = 0
    outputs = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs = out
        shared_refs = max(shared_refs, max(b.ref_cnt for b in engine.kv_cache.pool.blocks))
    assert shared_refs == 4     # the leader's full prompt blocks are held by all four samples
    texts = [tuple(o.token_ids) for o in outputs.outputs]
    assert len(set(texts)) > 1  # distinct seeds per sample
    assert [o.index for o in outputs.outputs] == [0, 1, 2, 3]
    again = llm.generate(prompt, SamplingParams(n=4, seed=3, max_tokens=10, ignore_eos=True))
    assert [tuple(o.token_ids) for o in again[0].outputs] == texts
    assert_pool_full(llm)


def test_seeded_sampling_is_reproducible_in_any_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(PROMPTS[2], params)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=16) for _ in PROMPTS]
    mixed = llm.generate(PROMPTS[:2] + [PROMPTS[2]] + PROMPTS[3:], others[:2] + [params] + others[3:])
    assert mixed[2].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16, ignore_eos=True)
    assert llm.generate(PROMPTS[2], other_seed)[0].outputs[0].token_ids != alone


def test_logprobs_are_consistent(llm):
    out = llm.generate(PROMPTS[1], greedy(max_tokens=6, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == 6
    total = 0.0
    for token_id, entry in zip(out.token_ids, out.logprobs):
        assert entry[token_id].rank == 1                   # greedy picks the top token
        assert len(entry) == 3 and all(v.logprob <= 0 for v in entry.values())
        assert max(v.logprob for v in entry.values()) == entry[token_id].logprob
        total += entry[token_id].logprob
    assert out.cumulative_logprob == pytest.approx(total)


def test_stop_string_never_in_output(llm):
    full = llm.generate(PROMPTS[3], greedy(max_tokens=24))[0].outputs[0].text
    assert len(full) > 6
    stop = full[4:6]
    out = llm.generate(PROMPTS[3], greedy(max_tokens=24, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[:full.index(stop)]
    assert_pool_full(llm)


def test_kv_waste_stays_under_four_percent(tiny_llama_dir):
    """PagedAttention's claim: at most one partial block per sequence is wasted."""
    llm = make_llm(tiny_llama_dir, num_blocks=600, max_num_batched_tokens=1024, max_num_seqs=16,
                   max_model_len=1200)
    llm.engine.stats.record_history = True
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randrange(512, 1000))] for _ in range(24)]
    params = [greedy(max_tokens=rng.randrange(8, 48)) for _ in prompts]
    llm.generate(prompts, params)
    history = llm.engine.stats.kv_waste_history
    assert len(history) > 20
    assert max(history) < 0.04, f"worst step wasted {max(history):.2%} of allocated slots"
    assert_pool_full(llm)


@pytest.mark.parametrize("params, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(n=0), "n"),
    (dict(min_p=2.0), "min_p"), (dict(logprobs=-1), "logprobs")])
def test_invalid_sampling_params_name_the_field(params, field):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**params)
    assert info.value.param == field and field in str(info.value)


def test_bad_prompts_raise_and_leak_nothing(tiny_llama_dir):
    llm = make_llm(tiny_llama_dir, max_model_len=64)
    with pytest.raises(InvalidRequestError, match="empty") as info:
        llm.generate([PROMPTS[0], ""], greedy())
    assert info.value.param == "prompt"
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        llm.generate([PROMPTS[0], list(range(3, 70))], greedy())
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        llm.generate([[5, 99999]], greedy())
    assert_pool_full(llm)
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate(PROMPTS[0], greedy(max_tokens=3))[0].outputs[0].token_ids


def test_bad_models_raise_clear_errors(tmp_path, tiny_llama_dir):
    with pytest.raises(ConfigError, match="does not exist"):
        LLM(str(tmp_path / "nowhere"), device="cpu")
    import json
    import shutil
    odd = tmp_path / "gpt2"
    shutil.copytree(tiny_llama_dir, odd)
    config = json.loads((odd / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (odd / "config.json").write_text(json.dumps(config))
    from kvport.platforms.registry import UnsupportedModelError
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*supported: .*LlamaForCausalLM"):
        LLM(str(odd), device="cpu")
    with pytest.raises(ConfigError, match="max_model_len"):
        make_llm(tiny_llama_dir, max_model_len=100_000)
    with pytest.raises(ConfigError, match="unknown option"):
        LLM(tiny_llama_dir, device="cpu", not_an_option=1)


def test_chat_applies_the_template(llm):
    out = llm.chat([{"role": "user", "content": "hello"}], greedy(max_tokens=4))[0]
    tokenizer = llm.get_tokenizer()
    assert tokenizer.decode(out.prompt_token_ids).startswith("<s>user: hello")
    assert len(out.outputs[0].token_ids) == 4


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_other_families_match_transformers_through_the_engine(family, tmp_path):
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
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:4], greedy(max_tokens=16))] == expected


def test_offline_llm_refuses_replicas(tiny_llama_dir):
    """Replicas live behind the HTTP front end; LLM(...) must not quietly run one engine."""
    with pytest.raises(ConfigError, match="data_parallel_size"):
        LLM(tiny_llama_dir, device="cpu", data_parallel_size=2, distributed_executor="ray")
