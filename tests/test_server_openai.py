"""End to end: the real `kvport serve` on a loopback port, driven by the official openai SDK.

One server (the tiny random Llama, with an API key) serves most tests; a second one (SmolLM2,
one running and one waiting request at most, no key) checks real text and the 503 path.
"""
from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import httpx
import openai
import pytest

from server_fixtures import ServerProcess, scrape, wait_until_idle

API_KEY = "sk-kvport-test"
MODEL = "tiny"
MAX_MODEL_LEN = 512
HELLO = [{"role": "user", "content": "hello world"}]
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    process = ServerProcess(tiny_llama_dir, "--served-model-name", MODEL, "--max-model-len",
                            str(MAX_MODEL_LEN), "--num-blocks", "1024", api_key=API_KEY)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0,
                         timeout=180)


@pytest.fixture(scope="module")
def auth():
    return {"Authorization": f"Bearer {API_KEY}"}


def post(server, path: str, body=None, headers=None, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}", **(headers or {})}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=180, **kwargs)


def count_tokens(server, **body) -> int:
    return post(server, "/tokenize", body).json()["count"]


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS, error
    if param is not None:
        assert error["param"] == param, error
    return error


# ------------------------------------------------------------------------ basic routes
def test_models_health_version(server, client, tiny_llama_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].root == tiny_llama_dir and models[0].max_model_len == MAX_MODEL_LEN
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert httpx.get(server.url + "/health").status_code == 200   # open without the key
    assert httpx.get(server.url + "/version").json()["version"]


def test_chat_completion_and_usage(server, client):
    result = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8,
                                            temperature=0, extra_body={"ignore_eos": True})
    assert result.id.startswith("chatcmpl-") and result.object == "chat.completion"
    assert result.model == MODEL and len(result.choices) == 1
    choice = result.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    usage = result.usage
    assert usage.completion_tokens == 8
    assert usage.prompt_tokens == count_tokens(server, messages=HELLO)
    assert usage.total_tokens == usage.prompt_tokens + 8
    assert usage.prompt_tokens_details.cached_tokens >= 0


def test_completion_text_token_ids_and_batches(server, client):
    ids = post(server, "/tokenize", {"prompt": "hello world"}).json()["tokens"]
    by_text = client.completions.create(model=MODEL, prompt="hello world", max_tokens=6,
                                        temperature=0, extra_body={"ignore_eos": True})
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_text.id.startswith("cmpl-") and by_text.object == "text_completion"
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == len(ids) and by_text.usage.completion_tokens == 6
    other = post(server, "/tokenize", {"prompt": "the quick brown fox"}).json()["count"]
    batch = client.completions.create(model=MODEL, prompt=["hello world", "the quick brown fox"],
                                      n=2, max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text   # greedy: both samples agree
    assert batch.usage.prompt_tokens == len(ids) + other
    assert batch.usage.completion_tokens == 16


def test_default_max_tokens(server, client):
    """Completions default to 16 tokens; chat fills the context (max_model_len - prompt)."""
    result = client.completions.create(model=MODEL, prompt="hello", temperature=0,
                                       extra_body={"ignore_eos": True})
    assert result.usage.completion_tokens == 16
    def conversation(repeats: int) -> list[dict]:
        return [{"role": "user", "content": "hello world " * repeats}]
    one, two = (count_tokens(server, messages=conversation(r)) for r in (1, 2))
    repeats = (MAX_MODEL_LEN - 8 - one) // (two - one) + 1   # leaves room for a few tokens
    messages = conversation(repeats)
    prompt_tokens = count_tokens(server, messages=messages)
    assert MAX_MODEL_LEN - 16 < prompt_tokens < MAX_MODEL_LEN, prompt_tokens
    chat = client.chat.completions.create(model=MODEL, messages=messages,
                                          extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == MAX_MODEL_LEN - prompt_tokens
    assert chat.choices[0].finish_reason == "length"


def test_max_completion_tokens_wins(client):
    result = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=9,
                                            max_completion_tokens=3,
                                            extra_body={"ignore_eos": True})
    assert result.usage.completion_tokens == 3


def test_echo_and_content_parts(server, client):
    common = dict(model=MODEL, prompt="hello world", max_tokens=2, temperature=0,
                  extra_body={"ignore_eos": True})
    plain = client.completions.create(**common).choices[0].text
    assert client.completions.create(echo=True, **common).choices[0].text == "hello world" + plain
    parts = [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]
    chat = client.chat.completions.create(model=MODEL, max_tokens=1,
                                          messages=[{"role": "user", "content": parts}])
    assert chat.usage.prompt_tokens == count_tokens(server, messages=HELLO)


# ------------------------------------------------------------------------- streaming
def _collect_stream(chunks) -> tuple[dict, dict, list, object]:
    """Join a stream: text and finish reasons per choice index, per-chunk token counts."""
    texts, finishes, token_counts, usage = defaultdict(str), defaultdict(list), [], None
    for chunk in chunks:
        if chunk.usage is not None:
            assert chunk.choices == []   # the usage chunk carries no choices
            usage = chunk.usage
        for choice in chunk.choices:
            delta = getattr(choice, "delta", None)
            texts[choice.index] += (delta.content or "") if delta else choice.text
            if choice.finish_reason is not None:
                finishes[choice.index].append(choice.finish_reason)
            if choice.logprobs is not None:
                content = getattr(choice.logprobs, "content", None)
                token_counts.append(len(content) if content is not None
                                    else len(choice.logprobs.tokens))
    return texts, finishes, token_counts, usage


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stream_joined_equals_non_stream(client, endpoint):
    common = dict(model=MODEL, n=2, max_tokens=10, temperature=1.0, seed=1234,
                  extra_body={"ignore_eos": True})
    if endpoint == "chat":
        create, common = client.chat.completions.create, dict(common, messages=HELLO,
                                                             logprobs=True, top_logprobs=2)
    else:
        create, common = client.completions.create, dict(common, prompt="hello", logprobs=2)
    full = create(**common)
    texts, finishes, token_counts, usage = _collect_stream(
        create(stream=True, stream_options={"include_usage": True}, **common))
    expected = {c.index: (c.message.content if endpoint == "chat" else c.text)
                for c in full.choices}
    assert dict(texts) == expected
    assert dict(finishes) == {0: ["length"], 1: ["length"]}   # exactly one per choice
    assert token_counts == [1] * 20   # one chunk per token
    assert usage.completion_tokens == full.usage.completion_tokens == 20
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_sse_framing(server):
    body = {"messages": HELLO, "max_tokens": 3, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers=headers, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1


# -------------------------------------------------------------- sampling and logprobs
def test_completion_logprobs(client):
    result = client.completions.create(model=MODEL, prompt="hello", max_tokens=5,
                                       temperature=0, logprobs=3,
                                       extra_body={"ignore_eos": True})
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 5
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    for sampled, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert sampled <= 0 and 1 <= len(top) <= 4
        assert sampled >= max(top.values()) - 1e-5   # greedy: the sampled token is the best


def test_chat_logprobs(client):
    result = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5,
                                            temperature=0, logprobs=True, top_logprobs=3,
                                            extra_body={"ignore_eos": True})
    content = result.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        values = [top.logprob for top in entry.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert entry.logprob == pytest.approx(values[0], abs=1e-5)
        assert isinstance(entry.bytes, list)
    plain = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2,
                                           logprobs=True)
    assert all(entry.top_logprobs == [] for entry in plain.choices[0].logprobs.content)


def test_stop_strings(client):
    common = dict(model=MODEL, prompt="the quick brown", max_tokens=24, temperature=0,
                  extra_body={"ignore_eos": True})
    text = client.completions.create(**common).choices[0].text
    cut = next((i for i, ch in enumerate(text) if i > 0 and ch.isascii() and ch.isalnum()), None)
    if cut is None:
        pytest.skip(f"no ASCII letter in the greedy text {text!r} to stop on")
    stop = text[cut]
    for stop_param in (stop, [stop, "@@never@@"]):
        choice = client.completions.create(stop=stop_param, **common).choices[0]
        assert (choice.text, choice.finish_reason) == (text[:cut], "stop")
        assert choice.model_extra["stop_reason"] == stop
    kept = client.completions.create(stop=stop, **dict(common, extra_body={
        "ignore_eos": True, "include_stop_str_in_output": True})).choices[0]
    assert kept.text == text[:cut + 1]
    texts, finishes, _, _ = _collect_stream(client.completions.create(stop=stop, stream=True,
                                                                      **common))
    assert (texts[0], finishes[0]) == (text[:cut], ["stop"])


def test_seeds(client):
    def sample(seed):
        return client.completions.create(model=MODEL, prompt="hello", max_tokens=12,
                                         temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text
    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_vllm_extensions(client):
    greedy = client.completions.create(model=MODEL, prompt="hello", max_tokens=6,
                                       temperature=0, extra_body={"ignore_eos": True})
    top1 = client.completions.create(model=MODEL, prompt="hello", max_tokens=6,
                                     temperature=1.0, extra_body={"ignore_eos": True,
                                                                  "top_k": 1})
    assert top1.choices[0].text == greedy.choices[0].text
    result = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=4, presence_penalty=0.5, frequency_penalty=0.5,
        top_p=0.9, extra_body={"repetition_penalty": 1.2, "min_p": 0.05, "top_k": 20,
                               "min_tokens": 4, "ignore_eos": True})
    assert result.usage.completion_tokens == 4


# --------------------------------------------------------------------------- errors
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.mark.parametrize("path, body, param", [
    (CHAT, {"messages": HELLO, "temperature": -1}, "temperature"),
    (CHAT, {"messages": HELLO, "n": 0}, "n"),
    (CHAT, {"messages": HELLO, "top_p": 1.5}, "top_p"),
    (CHAT, {"messages": HELLO, "max_tokens": "5"}, "max_tokens"),
    (CHAT, {"messages": HELLO, "stream": "yes"}, "stream"),
    (CHAT, {"messages": HELLO, "stop": 5}, "stop"),
    (CHAT, {"messages": HELLO, "top_logprobs": 3}, "top_logprobs"),
    (CHAT, {"messages": HELLO, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {}, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    (COMPLETIONS, {"prompt": "x", "logprobs": 21}, "logprobs"),
    (COMPLETIONS, {"prompt": [1, 99999]}, "prompt"),
    (COMPLETIONS, {"prompt": ""}, "prompt"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 5, "min_tokens": 9}, "min_tokens"),
    (COMPLETIONS, {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    (COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"5": 1.0}}, "logit_bias"),
    (COMPLETIONS, {"prompt": "x", "suffix": "y"}, "suffix"),
    (COMPLETIONS, {"prompt": "x", "best_of": 3}, "best_of"),
    (COMPLETIONS, {"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
    (CHAT, {"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools"),
    (CHAT, {"messages": HELLO, "response_format": {"type": "json_schema"}}, "response_format"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
])
def test_invalid_parameters_are_400(server, path, body, param):
    assert_error(post(server, path, body), 400, param)


def test_sdk_raises_bad_request_with_param(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=HELLO, temperature=-1)
    assert info.value.status_code == 400 and info.value.param == "temperature"


def test_context_length_is_400(server, client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=[5] * 500, max_tokens=20)
    assert info.value.param == "max_tokens"
    assert_error(post(server, COMPLETIONS, {"prompt": [5] * MAX_MODEL_LEN}), 400, "prompt")
    long_chat = [{"role": "user", "content": "hello world " * 300}]
    assert_error(post(server, CHAT, {"messages": long_chat}), 400, "messages")
    assert_error(post(server, CHAT, {"messages": HELLO, "max_completion_tokens": 10_000}),
                 400, "max_completion_tokens")


def test_malformed_requests_are_clean_4xx(server):
    raw = {"Authorization": f"Bearer {API_KEY}"}
    for content in (b"{not json", b"[1, 2]", b"", b"\xff\xfe", b'"text"', b"null"):
        response = httpx.post(server.url + CHAT, content=content, headers=raw, timeout=30)
        assert_error(response, 400)
    huge = b'{"prompt": "' + b"a" * (5 * 2**20) + b'"}'
    assert_error(httpx.post(server.url + COMPLETIONS, content=huge, headers=raw, timeout=30), 413)
    # curl -d sends form content-type; the body is JSON all the same (unknown fields ignored)
    response = httpx.post(server.url + COMPLETIONS, headers={**raw, "Content-Type":
                          "application/x-www-form-urlencoded"}, timeout=60,
                          content=b'{"prompt": "hi", "max_tokens": 2, "unknown_field": 1}')
    assert response.status_code == 200, response.text


def test_unknown_model_route_and_method(server, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert info.value.code == "model_not_found"
    assert_error(httpx.get(server.url + "/v1/nope"), 404)
    assert_error(httpx.get(server.url + COMPLETIONS, headers={"Authorization": "x"}), 405)


def test_api_key_required(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert_error(httpx.post(server.url + CHAT, json={"messages": HELLO}), 401)
    assert_error(httpx.post(server.url + "/tokenize", json={"prompt": "x"}), 401)
    assert httpx.get(server.url + "/metrics").status_code == 200   # scrapers need no key


# ----------------------------------------------------------------- tokenizer routes
def test_tokenize_detokenize(server, client):
    tokens = post(server, "/tokenize", {"prompt": "hello world", "return_token_strs": True})
    body = tokens.json()
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"])
    assert body["max_model_len"] == MAX_MODEL_LEN
    detok = post(server, "/detokenize", {"tokens": body["tokens"]}).json()
    assert detok["prompt"] == "hello world"
    assert_error(post(server, "/detokenize", {"tokens": [10**6]}), 400, "tokens")
    assert_error(post(server, "/tokenize", {}), 400)
    chat = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
    assert chat.usage.prompt_tokens == count_tokens(server, messages=HELLO)


# ------------------------------------------------------------------------- metrics
def test_metrics_and_prefix_cache(server, client):
    before = scrape(server.url)
    prompt = "the quick brown fox jumps over the lazy dog " * 6
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    assert second.usage.prompt_tokens_details.cached_tokens >= 32
    after = scrape(server.url)
    for name in ("kvport:num_requests_running", "kvport:num_requests_waiting",
                 "kvport:kv_cache_usage_perc", "kvport:num_preemptions_total"):
        assert name in after
    assert after["kvport:prefix_cache_hit_rate"] > 0
    assert after["kvport:prefix_cache_hits_total"] > before["kvport:prefix_cache_hits_total"]
    grew = after["kvport:prompt_tokens_total"] - before["kvport:prompt_tokens_total"]
    assert grew == first.usage.prompt_tokens + second.usage.prompt_tokens
    assert after["kvport:generation_tokens_total"] - before["kvport:generation_tokens_total"] == 4
    for histogram in ("time_to_first_token_seconds", "time_per_output_token_seconds",
                      "e2e_request_latency_seconds"):
        name = f"kvport:{histogram}_count"
        assert after[name] >= before[name] + 2
    assert after["kvport:request_success_total{finished_reason=length}"] >= 2


# ----------------------------------------------------------- isolation and load
def _aborted(metrics: dict) -> float:
    return metrics.get("kvport:request_success_total{finished_reason=abort}", 0.0)


def test_stream_disconnect_aborts_and_frees_kv(server, client):
    before = wait_until_idle(server.url)
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=400,
                                            stream=True, extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(4), stream):
        pass
    assert scrape(server.url)["kvport:kv_cache_usage_perc"] > 0
    stream.close()   # the client goes away mid-stream
    after = wait_until_idle(server.url, timeout=15)
    assert _aborted(after) == _aborted(before) + 1
    generated = after["kvport:generation_tokens_total"] - before["kvport:generation_tokens_total"]
    assert generated < 400
    result = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert result.usage.completion_tokens >= 1   # and it keeps serving


def test_non_stream_disconnect_aborts_and_frees_kv(server, auth):
    """A non-streaming client that goes away while its request runs: the request is aborted.

    The client disconnects once /metrics shows the request running, so the outcome does not
    depend on how fast the machine is."""
    before = wait_until_idle(server.url)
    body = {"prompt": "hello", "max_tokens": 480, "n": 4, "ignore_eos": True}

    async def disconnect_while_running() -> bool:
        async with httpx.AsyncClient(timeout=60) as http:
            task = asyncio.create_task(http.post(server.url + COMPLETIONS, headers=auth, json=body))
            deadline = time.monotonic() + 30
            while (await asyncio.to_thread(scrape, server.url))["kvport:num_requests_running"] == 0:
                assert not task.done(), f"the request ended before it was seen running: {task.result()}"
                assert time.monotonic() < deadline, "the request never started running"
            still_running = not task.done()
            task.cancel()           # closes the connection, as a client that gives up does
            return still_running

    assert asyncio.run(disconnect_while_running())
    after = wait_until_idle(server.url, timeout=15)
    assert _aborted(after) == _aborted(before) + 1
    generated = after["kvport:generation_tokens_total"] - before["kvport:generation_tokens_total"]
    assert generated < 4 * 480


def test_256_concurrent_streams(server):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, int]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"client {i}"}], max_tokens=2,
            stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        texts, finishes, _, usage = _collect_stream([chunk async for chunk in stream])
        return finishes[0], usage.completion_tokens

    async def run_all() -> list:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY,
                                    max_retries=0, timeout=300)
        async with client:
            return await asyncio.gather(*(one(client, i) for i in range(256)))

    results = asyncio.run(run_all())
    assert results == [(["length"], 2)] * 256
    wait_until_idle(server.url)


# --------------------------------------------- SmolLM2: real text and a tiny queue
@pytest.fixture(scope="module")
def queue_server(smollm2_path):
    """One running request and one waiting request at most; everything else gets 503."""
    process = ServerProcess(smollm2_path, "--max-model-len", "1024", "--num-blocks", "128",
                            "--max-num-seqs", "1", "--max-waiting-requests", "1")
    yield process
    process.stop()


@pytest.mark.slow
def test_real_text(queue_server):
    client = openai.OpenAI(base_url=queue_server.url + "/v1", api_key="unused", max_retries=0,
                           timeout=180)
    model = client.models.list().data[0].id
    chat = client.chat.completions.create(
        model=model, temperature=0, max_tokens=10,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in chat.choices[0].message.content
    assert chat.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_full_queue_gets_503_and_nothing_breaks(queue_server):
    body = {"prompt": "Once upon a time", "max_tokens": 3, "ignore_eos": True}

    async def one(client: httpx.AsyncClient, stream: bool) -> tuple[int, dict, str]:
        response = await client.post("/v1/completions", json=dict(body, stream=stream))
        return response.status_code, dict(response.headers), response.text

    async def burst() -> list:
        async with httpx.AsyncClient(base_url=queue_server.url, timeout=180) as client:
            return await asyncio.gather(*(one(client, i % 2 == 0) for i in range(12)))

    results = asyncio.run(burst())
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    for status, headers, text in results:
        if status == 503:
            assert headers["retry-after"] == "1"
            assert_error(httpx.Response(503, content=text), 503)
        elif text.startswith("data:"):
            assert text.rstrip().endswith("data: [DONE]") and '"length"' in text
        else:
            assert '"completion_tokens":3' in text
    wait_until_idle(queue_server.url)
    after = httpx.post(queue_server.url + "/v1/completions", json=body, timeout=180)
    assert after.status_code == 200
