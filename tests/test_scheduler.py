"""Scheduler unit tests, driven by a fake worker that rebuilds its state from SchedulerOutput.

The fake model's next token is a function of the whole sequence, so any mistake in what the
scheduler tells the worker (tokens, positions, resumed requests) changes the outputs.
"""
import random

from kvport.core.config import SchedulerConfig
from kvport.core.kv_cache_manager import KVCacheManager
from kvport.core.request import Request, RequestStatus
from kvport.core.sampling_params import SamplingParams
from kvport.core.scheduler import Scheduler
from kvport.core.worker import ModelRunnerOutput, SchedulerOutput


def next_token(tokens):
    return (sum(t * (i + 1) for i, t in enumerate(tokens)) % 997) + 3


class FakeWorker:
    """Keeps per-request state the way a real worker must, and checks what it is sent."""

    def __init__(self, block_size):
        self.block_size = block_size
        self.states = {}
        self.steps = []

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for rid in out.freed_req_ids:
            self.states.pop(rid)
        for new in out.new_requests:
            assert new.req_id not in self.states
            self.states[new.req_id] = {"tokens": new.prompt_token_ids + new.output_token_ids,
                                       "blocks": list(new.block_ids),
                                       "computed": new.num_computed_tokens}
        for cached in out.cached_requests:
            state = self.states[cached.req_id]
            assert state["computed"] == cached.num_computed_tokens
            state["blocks"] += cached.new_block_ids
        result = ModelRunnerOutput()
        self.steps.append(dict(out.num_scheduled_tokens))
        for rid, count in out.num_scheduled_tokens.items():
            state = self.states[rid]
            state["computed"] += count
            assert len(state["blocks"]) * self.block_size >= state["computed"]
            if state["computed"] == len(state["tokens"]):
                token = next_token(state["tokens"])
                state["tokens"].append(token)
                result.req_ids.append(rid)
                result.sampled_token_ids.append(token)
        return result


def run(scheduler, worker, limit=10_000):
    for _ in range(limit):
        if not scheduler.has_unfinished_requests():
            return
        out = scheduler.schedule()
        scheduler.update_from_output(worker.execute(out))
    raise AssertionError("did not finish")


def make(num_blocks=64, block_size=4, budget=32, max_seqs=8, caching=True, max_len=512):
    kv = KVCacheManager(num_blocks, block_size, caching)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget),
                          kv, max_model_len=max_len)
    return scheduler, FakeWorker(block_size), kv


def request(rid, prompt, max_tokens=8, **kw):
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, **kw))


def expected_output(prompt, max_tokens):
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


def test_chunked_prefill_under_token_budget():
    scheduler, worker, kv = make(budget=32)
    req = request("a", range(100), max_tokens=3)
    scheduler.add_request(req)
    run(scheduler, worker)
    assert [s["a"] for s in worker.steps] == [32, 32, 32, 4, 1, 1]
    assert req.output_token_ids == expected_output(range(100), 3)
    assert req.status == RequestStatus.FINISHED_LENGTH
    assert kv.pool.num_free_blocks == kv.pool.num_blocks


def test_budget_is_shared_decode_first_then_fcfs_prefill():
    scheduler, worker, _ = make(budget=16)
    scheduler.add_request(request("a", range(10), max_tokens=4))
    scheduler.add_request(request("b", range(20, 50), max_tokens=4))
    out = scheduler.schedule()
    assert out.num_scheduled_tokens == {"a": 10, "b": 6}
    scheduler.update_from_output(worker.execute(out))
    out = scheduler.schedule()
    assert out.num_scheduled_tokens == {"a": 1, "b": 15}
    assert sum(out.num_scheduled_tokens.values()) <= 16


def test_max_num_seqs_limits_running():
    scheduler, worker, _ = make(max_seqs=2, budget=1000)
    for i in range(5):
        scheduler.add_request(request(f"r{i}", range(i, i + 5), max_tokens=2))
    out = scheduler.schedule()
    assert list(out.num_scheduled_tokens) == ["r0", "r1"]
    scheduler.update_from_output(worker.execute(out))
    run(scheduler, worker)
    assert all(len(s) <= 2 for s in worker.steps)


def test_preemption_by_recompute_gives_same_tokens_and_frees_everything():
    prompts = [list(range(i * 7, i * 7 + 13)) for i in range(6)]
    reference = {f"r{i}": expected_output(p, 20) for i, p in enumerate(prompts)}
    scheduler, worker, kv = make(num_blocks=14, block_size=4, budget=64, max_seqs=6)
    reqs = [request(f"r{i}", p, max_tokens=20) for i, p in enumerate(prompts)]
    for r in reqs:
        scheduler.add_request(r)
    run(scheduler, worker)
    assert scheduler.num_preemptions > 0
    assert {r.request_id: r.output_token_ids for r in reqs} == reference
    assert kv.pool.num_free_blocks == kv.pool.num_blocks


def test_abort_frees_blocks_and_tells_worker():
    scheduler, worker, kv = make()
    a, b = request("a", range(30), max_tokens=50), request("b", range(9), max_tokens=50)
    scheduler.add_request(a)
    scheduler.add_request(b)
    for _ in range(3):
        scheduler.update_from_output(worker.execute(scheduler.schedule()))
    scheduler.finish_request(a, RequestStatus.FINISHED_ABORTED)
    assert kv.num_blocks_of("a") == 0
    out = scheduler.schedule()
    assert out.freed_req_ids == ["a"] and "a" not in out.num_scheduled_tokens
    scheduler.update_from_output(worker.execute(out))
    scheduler.finish_request(b, RequestStatus.FINISHED_ABORTED)
    assert kv.pool.num_free_blocks == kv.pool.num_blocks


def test_stop_conditions():
    scheduler, worker, _ = make()
    first = expected_output(range(5), 3)
    eos = request("eos", range(5), max_tokens=10)
    eos.sampling_params.eos_token_ids = (first[1],)
    stop_tok = request("stop", range(5), max_tokens=10, stop_token_ids=[first[2]])
    min_tok = request("min", range(5), max_tokens=10, min_tokens=3)
    min_tok.sampling_params.eos_token_ids = (first[1],)
    ignore = request("ign", range(5), max_tokens=4, ignore_eos=True)
    ignore.sampling_params.eos_token_ids = (first[0],)
    for r in (eos, stop_tok, min_tok, ignore):
        scheduler.add_request(r)
    run(scheduler, worker)
    assert (eos.status, eos.output_token_ids, eos.stop_reason) == (RequestStatus.FINISHED_STOPPED, first[:2], None)
    assert (stop_tok.status, stop_tok.stop_reason) == (RequestStatus.FINISHED_STOPPED, first[2])
    assert len(min_tok.output_token_ids) == 10   # eos came before min_tokens, not after
    assert ignore.status == RequestStatus.FINISHED_LENGTH and len(ignore.output_token_ids) == 4


def test_max_model_len_caps_generation():
    scheduler, worker, _ = make(max_len=12)
    r = request("a", range(8), max_tokens=100)
    scheduler.add_request(r)
    run(scheduler, worker)
    assert r.num_tokens == 12 and r.status == RequestStatus.FINISHED_LENGTH


def test_prefix_cache_hit_skips_computation():
    scheduler, worker, kv = make(block_size=4, budget=100)
    scheduler.add_request(request("a", range(20), max_tokens=2))
    run(scheduler, worker)
    b = request("b", list(range(16)) + [77, 78], max_tokens=2)
    scheduler.add_request(b)
    out = scheduler.schedule()
    assert out.num_scheduled_tokens["b"] == 2 and b.num_cached_tokens == 16
    scheduler.update_from_output(worker.execute(out))
    run(scheduler, worker)
    assert b.output_token_ids == expected_output(b.prompt_token_ids, 2)


def test_random_mix_of_finish_abort_preempt_leaves_pool_full():
    rng = random.Random(1)
    scheduler, worker, kv = make(num_blocks=40, block_size=4, budget=48, max_seqs=6)
    live = []
    for step in range(400):
        if rng.random() < 0.3:
            prompt = [rng.randrange(50) for _ in range(rng.randrange(1, 40))]
            r = request(f"r{step}", prompt, max_tokens=rng.randrange(1, 30),
                        n=1)
            scheduler.add_request(r)
            live.append(r)
        if live and rng.random() < 0.05:
            victim = rng.choice(live)
            scheduler.finish_request(victim, RequestStatus.FINISHED_ABORTED)
        if scheduler.has_unfinished_requests():
            scheduler.update_from_output(worker.execute(scheduler.schedule()))
    run(scheduler, worker)
    assert scheduler.num_preemptions > 0
    assert kv.pool.num_free_blocks == kv.pool.num_blocks
    for r in live:
        if r.status != RequestStatus.FINISHED_ABORTED:
            assert r.output_token_ids == expected_output(r.prompt_token_ids, len(r.output_token_ids))
