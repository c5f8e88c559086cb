"""kvport-cpu's native decoder (csrc/llama_decode.cpp, kvport_cpu/native_decoder.py): a whole
decode step in one call, against the model's own modules on the same inputs and caches.

The first test in a process builds the extension (~25 s on 2 cores, cached on disk after)."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from kvport.attention_backends.interface import CommonAttentionMetadata

BLOCKS_PER_REQ = 16


@pytest.fixture(scope="module")
def decoder_class():
    from kvport_cpu.native import llama_decoder_class
    built = llama_decoder_class()
    if built.op is None:
        pytest.skip(f"native decoder unavailable: {built.reason}")
    return built.op


def load(path: str, **kw):
    from kvport import LLM
    return LLM(model=path, max_num_seqs=16, block_size=8, **kw)


def metadata(backend, query_lens, seq_lens, block_size):
    """A step of requests i = 0.. with the given query and context lengths, request i in
    blocks [16 i, 16 i + 16)."""
    n = len(query_lens)
    table = np.stack([np.arange(i * BLOCKS_PER_REQ, (i + 1) * BLOCKS_PER_REQ)
                      for i in range(n)]).astype(np.int32)
    slots = [table[i, p // block_size] * block_size + p % block_size
             for i in range(n) for p in range(seq_lens[i] - query_lens[i], seq_lens[i])]
    common = CommonAttentionMetadata(
        np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32),
        np.asarray(seq_lens, np.int32), table, np.asarray(slots, np.int64))
    return backend.build_metadata(common, "cpu")


def decode_step_both_ways(llm, contexts: list[int], seed: int = 0):
    """Prefill len(contexts) random prompts (the model's modules), then run one decode step
    for all of them through the model and through the native decoder, each on its own copy
    of the caches. Returns (model hidden, native hidden, model caches, native caches)."""
    worker = llm.engine.worker
    model, wrapper, backend = worker.model, worker.runner.model, worker.attn_backend
    bs = worker.config.cache.block_size
    caches = [torch.zeros_like(c[:, :BLOCKS_PER_REQ * len(contexts)])
              for c in worker.runner.kv_caches]
    g = torch.Generator().manual_seed(seed)
    vocab = model.vocab_size
    with torch.inference_mode():
        for i, length in enumerate(contexts):
            prompt = torch.randint(0, vocab, (length,), generator=g)
            md = metadata(backend, [length], [length], bs)
            md.slot_mapping += i * BLOCKS_PER_REQ * bs        # request i's own blocks
            model(prompt, torch.arange(length), caches, md)
        step = metadata(backend, [1] * len(contexts), [c + 1 for c in contexts], bs)
        tokens = torch.randint(0, vocab, (len(contexts),), generator=g)
        positions = torch.tensor(contexts)
        native_caches = [c.clone() for c in caches]
        expected = model(tokens, positions, caches, step)
        got = wrapper(tokens, positions, native_caches, step)
    return expected, got, caches, native_caches


FAMILIES = [
    ("llama", {}),                                                     # head size 16
    ("qwen2", {}),                                                     # qkv bias
    ("qwen3", {}),                                                     # per-head q/k norm
    ("mistral", dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                     sliding_window=24)),                              # head size 64, window
]


@pytest.fixture(scope="module", params=FAMILIES, ids=[f for f, _ in FAMILIES])
def family_dir(request, tmp_path_factory, decoder_class):
    from conftest import build_tiny_model
    family, overrides = request.param
    return build_tiny_model(str(tmp_path_factory.mktemp(family)), family, **overrides)


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_decode_step_matches_the_modules(family_dir, quantization):
    from kvport_cpu.native_decoder import NativeDecodeModel
    llm = load(family_dir, quantization=quantization)
    assert isinstance(llm.engine.worker.runner.model, NativeDecodeModel)
    # 1 and 3 requests take the int8 weight-streaming product, 10 take _int_mm; contexts
    # cross block boundaries and (mistral) the sliding window
    for contexts in ([37], [5, 90, 17], [3 + 11 * i for i in range(10)]):
        expected, got, caches, native_caches = decode_step_both_ways(llm, contexts)
        # float32 differs only in the rounding of sums and exp; int8 may flip the rounding
        # of an activation to int8, one step of the quantization grid
        tolerance = 2e-5 if quantization is None else 2e-3
        scale = expected.abs().max().item()
        assert (got - expected).abs().max().item() <= tolerance * scale, contexts
        for layer, (a, b) in enumerate(zip(caches, native_caches)):
            kv_scale = a.abs().max().item()
            assert (a - b).abs().max().item() <= tolerance * kv_scale, (contexts, layer)
    llm.engine.shutdown()


def test_greedy_tokens_match_the_modules(tiny_llama_dir, decoder_class, monkeypatch):
    """End to end, float32: prefill chunks and mixed steps run the model, all-decode steps
    the decoder; the tokens are those of the modules alone."""
    from kvport import SamplingParams
    from kvport_cpu.worker import CpuWorker
    prompts = [[5, 6, 7, 8], list(range(3, 60)), [9] * 21]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    tokens = {}
    for native in (True, False):
        monkeypatch.setattr(CpuWorker, "use_native_decoder", native)
        llm = load(tiny_llama_dir, max_num_batched_tokens=32)      # chunked prefills too
        assert (type(llm.engine.worker.runner.model).__name__ == "NativeDecodeModel") == native
        outs = llm.generate(prompts, params, use_tqdm=False)
        tokens[native] = [o.outputs[0].token_ids for o in outs]
        llm.engine.shutdown()
    assert tokens[True] == tokens[False]


def test_smollm2_greedy_tokens_match_the_modules(smollm2_path, decoder_class, monkeypatch):
    """The real model, float32: 24 greedy tokens of two chat prompts, decoder vs modules."""
    from kvport import LLM, SamplingParams
    from kvport_cpu.worker import CpuWorker
    prompts = ["Write a poem about the sea.", "What is the capital of France?"]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    tokens = {}
    for native in (True, False):
        monkeypatch.setattr(CpuWorker, "use_native_decoder", native)
        llm = LLM(model=smollm2_path, max_num_seqs=4, max_model_len=512)
        tokens[native] = [o.outputs[0].token_ids
                          for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.engine.shutdown()
    assert tokens[True] == tokens[False]


def test_models_that_do_not_qualify_say_why(tiny_llama_dir, decoder_class, monkeypatch):
    from kvport_cpu.attention import CpuPagedAttentionBackend
    from kvport_cpu.native_decoder import native_decoder_for
    llm = load(tiny_llama_dir, dtype="bfloat16")
    worker = llm.engine.worker
    assert type(worker.runner.model).__name__ == "LlamaForCausalLM"
    assert "model dtype torch.bfloat16" in native_decoder_for(worker.model,
                                                              worker.attn_backend).reason
    llm.engine.shutdown()

    llm = load(tiny_llama_dir)
    model, backend = llm.engine.worker.model, llm.engine.worker.attn_backend
    assert native_decoder_for(model, backend).reason == "native"
    assert "not a Llama-family model" in native_decoder_for(torch.nn.Linear(2, 2),
                                                            backend).reason
    monkeypatch.setattr(model, "tp", types.SimpleNamespace(world_size=2))
    assert "tensor parallelism" in native_decoder_for(model, backend).reason
    monkeypatch.undo()
    gather = CpuPagedAttentionBackend(backend.spec)
    gather.use_native_decode = False
    assert "no native decode path (gather+sdpa" in native_decoder_for(model, gather).reason
    llm.engine.shutdown()


def test_bad_steps_are_refused_clearly(tiny_llama_dir, decoder_class):
    llm = load(tiny_llama_dir)
    worker = llm.engine.worker
    decoder = worker.runner.model.decoder
    caches = [c[:, :BLOCKS_PER_REQ].clone() for c in worker.runner.kv_caches]
    step = metadata(worker.attn_backend, [1], [4], worker.config.cache.block_size)
    x = torch.zeros(1, 64)
    args = (step.native_decode.block_table, step.native_decode.seq_lens)
    with pytest.raises(RuntimeError, match="got 1 KV caches for 2 layers"):
        decoder.forward(x, torch.tensor([3]), caches[:1], *args, step.slot_mapping)
    with pytest.raises(RuntimeError, match="slot 999999 is outside the cache"):
        decoder.forward(x, torch.tensor([3]), caches, *args, torch.tensor([999999]))
    with pytest.raises(RuntimeError, match="position 5000 is outside the rotary table"):
        decoder.forward(x, torch.tensor([5000]), caches, *args, step.slot_mapping)
    with pytest.raises(RuntimeError, match=r"x must be contiguous float32 \[M, 64\]"):
        decoder.forward(x.double(), torch.tensor([3]), caches, *args, step.slot_mapping)
    with pytest.raises(RuntimeError, match="add_layer takes 16 tensors"):
        decoder.add_layer([torch.zeros(64)])
    llm.engine.shutdown()
