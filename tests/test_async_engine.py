"""The engine core in its own process, driven through AsyncLLMEngine from asyncio."""
import asyncio
import os
import signal

import pytest

from kvport import LLM, SamplingParams
from kvport.core.async_engine import AsyncLLMEngine, EngineDeadError, EngineStartupError
from kvport.core.config import EngineConfig
from kvport.core.engine import EngineOverloadedError
from kvport.core.sampling_params import InvalidRequestError

PROMPTS = [[(5 * i + j) % 250 + 3 for j in range(4 + 9 * i)] for i in range(6)]


def config(path, **kw):
    kw.setdefault("num_blocks", 128)
    return EngineConfig.from_kwargs(model=path, device="cpu", dtype="float32",
                                    max_model_len=512, **kw)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    engine = AsyncLLMEngine(config(tiny_llama_dir))
    engine.start(startup_timeout=120)
    yield engine
    engine.shutdown()


def run(engine, coro):
    async def main():
        engine.attach_loop(asyncio.get_running_loop())
        return await coro()
    return asyncio.run(main())


async def collect(engine, request_id, prompt, params):
    texts, tokens, finish = {}, {}, {}
    async for delta in engine.generate(request_id, prompt, params):
        for d in delta.deltas:
            texts[d.index] = texts.get(d.index, "") + d.text
            tokens.setdefault(d.index, []).extend(d.token_ids)
            if d.finish_reason:
                assert d.index not in finish, "a sample finished twice"
                finish[d.index] = d.finish_reason
    return texts, tokens, finish


def test_streamed_deltas_equal_offline_generation(engine, tiny_llama_dir):
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=7, max_tokens=12, n=2, ignore_eos=True)]

    async def all_requests():
        jobs = [collect(engine, f"r{i}-{j}", p, params[j])
                for i, p in enumerate(PROMPTS) for j in range(2)]
        return await asyncio.gather(*jobs)

    results = run(engine, all_requests)
    llm = LLM(tiny_llama_dir, device="cpu", dtype="float32", max_model_len=512, num_blocks=128)
    for i, prompt in enumerate(PROMPTS):
        for j in range(2):
            texts, tokens, finish = results[2 * i + j]
            offline = llm.generate(prompt, params[j], use_tqdm=False)[0]
            assert [tokens[k] for k in sorted(tokens)] == [o.token_ids for o in offline.outputs]
            assert [texts[k] for k in sorted(texts)] == [o.text for o in offline.outputs]
            assert set(finish.values()) == {"length"}
    assert engine.snapshot.kv_cache_usage == 0


def test_cancelled_consumer_aborts_and_frees_blocks(engine):
    async def scenario():
        params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        stream = engine.generate("long", PROMPTS[5], params)
        await stream.__anext__()
        await stream.__anext__()
        assert engine.snapshot.kv_cache_usage > 0
        await stream.aclose()           # what a disconnecting HTTP client does
        for _ in range(200):
            await asyncio.sleep(0.02)
            if engine.snapshot.kv_cache_usage == 0 and engine.snapshot.num_running == 0:
                break
        assert engine.snapshot.kv_cache_usage == 0
        _, tokens, _ = await collect(engine, "after", PROMPTS[0],
                                     SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        assert len(tokens[0]) == 3      # still serving
    run(engine, scenario)


def test_invalid_request_is_reported_to_its_caller_only(engine):
    async def scenario():
        with pytest.raises(InvalidRequestError, match="max_model_len") as info:
            await collect(engine, "too-long", [3 + j % 200 for j in range(600)],
                          SamplingParams(max_tokens=2))
        assert info.value.param == "prompt"
        _, tokens, _ = await collect(engine, "fine", PROMPTS[1],
                                     SamplingParams(temperature=0, max_tokens=2))
        assert tokens[0]
    run(engine, scenario)


def test_overloaded_queue_rejects(tiny_llama_dir):
    engine = AsyncLLMEngine(config(tiny_llama_dir, max_waiting_requests=0))
    engine.start(startup_timeout=120)
    try:
        async def scenario():
            with pytest.raises(EngineOverloadedError, match="waiting queue is full"):
                await collect(engine, "x", PROMPTS[0], SamplingParams(max_tokens=2))
        run(engine, scenario)
    finally:
        engine.shutdown()


def test_engine_death_fails_requests_in_flight(tiny_llama_dir):
    engine = AsyncLLMEngine(config(tiny_llama_dir))
    info = engine.start(startup_timeout=120)
    try:
        async def scenario():
            stream = engine.generate("doomed", PROMPTS[4],
                                     SamplingParams(max_tokens=5000 // 10, ignore_eos=True))
            await stream.__anext__()
            os.kill(info.pid, signal.SIGKILL)
            with pytest.raises(EngineDeadError, match="exited"):
                async for _ in stream:
                    pass
            assert not engine.is_alive
        run(engine, scenario)
    finally:
        engine.shutdown()


def test_startup_failure_carries_the_reason(tmp_path):
    engine = AsyncLLMEngine(EngineConfig.from_kwargs(model=str(tmp_path / "missing"),
                                                     device="cpu"))
    with pytest.raises(EngineStartupError, match="does not exist") as excinfo:
        engine.start(startup_timeout=120)
    assert "Traceback" not in str(excinfo.value)    # bad input: the message, no traceback
