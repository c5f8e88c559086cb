"""kvport on a GPU, end to end, against Hugging Face transformers on the same GPU.

Random-weight Llamas (head size 64, GQA 4) are built on the device and saved as Hugging
Face directories.

* float32: kvport's greedy tokens (chunked prefill, mixed steps, decode, CUDA graphs or eager,
  prefix caching) equal a plain greedy loop over transformers' float32 model. Weights are
  drawn N(0, 0.15), as in the CPU parity tests, so the logits have clear winners.
* bf16, teacher forced, on transformers' own init, all sequences batched, two kvport
  schedules: (1) a prefill of whole sequences, (2) a prefill of half of each sequence, then
  one decode step per token; transformers runs the same two (one forward; a forward over the
  half, then one cached decode step per token). On random weights the top two logits are
  often closer than bf16 rounding, so ANY change of matmul shapes or kernels flips some of
  them: on the H100 (2026-11-22) transformers' decode schedule agreed with its own forward at
  only 98.6% of positions, below issue 4's raw 99% bar. The test therefore asserts (a) >= 99%
  agreement with transformers bf16 at the positions whose float32 top-1 margin exceeds 4x
  transformers' own bf16 logit error there, for both schedules, (b) kvport's raw agreement
  with transformers is within 1.5 points of transformers' agreement with itself across
  schedules, (c) kvport's agreement with float32 is within 1 point of transformers' bf16;
  and it records every raw agreement.
* the platform: auto-selected, bf16 by default, KV cache sized from the profiled peak.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU test: torch sees no GPU")
transformers = pytest.importorskip("transformers")

from kvport.attention_backends.interface import AttentionSpec, CommonAttentionMetadata  # noqa: E402
from kvport.attention_backends.triton_paged import TritonPagedAttentionBackend  # noqa: E402

SHAPE = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, head_dim=64,
             max_position_embeddings=2048)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from conftest import build_tiny_model
    return build_tiny_model(str(tmp_path_factory.mktemp("gpu-llama")), "llama", seed=1, **SHAPE)


def report(name: str, value) -> None:
    folder = os.environ.get("KVPORT_GPU_REPORT_DIR")
    if folder:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"e2e_{name}.json"), "w") as f:
            json.dump(value, f)


def hf_model(path, dtype):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt], device="cuda")
    out = []
    for _ in range(n):
        token = int(model(ids).logits[0, -1].argmax())
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device="cuda")], dim=1)
    return out


def prompts_for(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


@pytest.mark.parametrize("enforce_eager, async_scheduling",
                         [(False, None), (True, None), (False, False)],
                         ids=["graphs-async", "eager-async", "graphs-sync"])
def test_greedy_fp32_equals_transformers(llama_dir, enforce_eager, async_scheduling):
    from kvport import LLM, SamplingParams

    # A fixed KV budget: other pytest workers share the GPU, so a fraction of its memory
    # may be taken already (the sizing has its own test below).
    llm = LLM(model=llama_dir, device="cuda", dtype="float32", max_num_seqs=8,
              max_num_batched_tokens=96, max_model_len=512, enforce_eager=enforce_eager,
              kv_cache_memory="2GiB", async_scheduling=async_scheduling)
    assert llm.engine.async_scheduling == (async_scheduling is None)   # the CUDA default
    vocab = llm.engine.model_info.vocab_size
    # 300 tokens: chunked over four steps; short prompts decode while it prefills
    prompts = prompts_for(vocab, (300, 7, 40, 1, 129, 16))
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    again = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert llm.engine.kv_cache.pool.num_cache_hits > 0          # the second pass hit the cache
    llm.engine.shutdown()
    del llm
    reference = hf_model(llama_dir, torch.float32)
    expected = [hf_greedy(reference, p, 24) for p in prompts]
    assert got == expected
    assert again == expected


def test_async_scheduling_equals_synchronous(llama_dir):
    """The CUDA runner's placeholder inputs (sampled ids fed on the GPU), under preemption,
    chunked prefill, stop strings, seeded sampling, penalties (which wait for the ids) and
    logprobs: async outputs equal the synchronous engine's."""
    from kvport import LLM, SamplingParams

    def run(async_scheduling):
        llm = LLM(model=llama_dir, device="cuda", dtype="float32", max_num_seqs=8,
                  max_num_batched_tokens=64, max_model_len=512, num_blocks=40,
                  async_scheduling=async_scheduling)
        vocab = llm.engine.model_info.vocab_size
        prompts = prompts_for(vocab, (200, 7, 40, 1, 129, 16, 90, 33), seed=5)
        params = [SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
                  SamplingParams(max_tokens=30, temperature=0.9, seed=7, ignore_eos=True),
                  SamplingParams(max_tokens=20, temperature=0.0, repetition_penalty=1.2,
                                 ignore_eos=True),
                  SamplingParams(max_tokens=25, temperature=0.0, logprobs=2, ignore_eos=True)]
        outputs = llm.generate(prompts, [params[i % 4] for i in range(len(prompts))],
                               use_tqdm=False)
        texts = [o.outputs[0].text for o in outputs]
        stop = texts[0][len(texts[0]) // 2:len(texts[0]) // 2 + 3]
        stopped = llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0.0,
                                                       ignore_eos=True, stop=[stop]),
                               use_tqdm=False)
        preemptions = llm.engine.scheduler.num_preemptions
        free = llm.engine.kv_cache.pool.num_free_blocks == llm.engine.num_blocks
        llm.engine.shutdown()
        return ([o.outputs[0].token_ids for o in outputs], texts,
                [o.outputs[0].text for o in stopped], preemptions, free)

    got, expected = run(True), run(False)
    assert got[3] > 0 and expected[3] > 0            # the small cache forced preemption
    assert got[4] and expected[4]                    # every block came back
    assert got[:3] == expected[:3]
    report("async_vs_sync", {"requests": len(got[0]), "preemptions_async": got[3],
                             "equal": True})


def teacher_forced_argmax(model, backend, sequences, prefill: int, block_size: int):
    """argmax of kvport's logits at every position: one mixed prefill step of each sequence's
    first `prefill` tokens, then one batched decode step per remaining token."""
    info_layers = len(model.model.layers)
    spec = backend.spec
    length = len(sequences[0])
    blocks_per_seq = -(-length // block_size)
    n = len(sequences)
    shape = backend.kv_cache_shape(n * blocks_per_seq + 1, block_size, spec.num_kv_heads,
                                   spec.head_size)
    caches = [torch.randn(shape, device="cuda").to(torch.bfloat16) for _ in range(info_layers)]
    table = (1 + np.arange(n * blocks_per_seq, dtype=np.int32)).reshape(n, blocks_per_seq)
    tokens = np.asarray(sequences, dtype=np.int64)
    argmax = np.zeros((n, length), dtype=np.int64)

    def run(start: int, end: int):
        pos = np.arange(start, end)
        q = end - start
        common = CommonAttentionMetadata(
            query_start_loc=(np.arange(n + 1) * q).astype(np.int32),
            seq_lens=np.full(n, end, dtype=np.int32), block_table=table,
            slot_mapping=(table[:, pos // block_size] * block_size
                          + pos % block_size).reshape(-1).astype(np.int64))
        ids = torch.from_numpy(tokens[:, start:end].reshape(-1)).cuda()
        positions = torch.from_numpy(np.tile(pos, n)).cuda()
        hidden = model(ids, positions, caches, backend.build_metadata(common, "cuda"))
        logits = model.compute_logits(hidden).view(n, q, -1)
        argmax[:, start:end] = logits.argmax(-1).cpu().numpy()

    with torch.inference_mode():
        run(0, prefill)
        for t in range(prefill, length):
            run(t, t + 1)
    return argmax


@torch.inference_mode()
def hf_teacher_forced_argmax(model, ids: torch.Tensor, prefill: int) -> np.ndarray:
    """transformers' top-1 at every position on kvport's schedule: one forward over the first
    `prefill` tokens, then one cached decode step per remaining token."""
    out = model(ids[:, :prefill], use_cache=True)
    cache, argmax = out.past_key_values, [out.logits.float().argmax(-1)]
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        argmax.append(out.logits.float().argmax(-1))
    return torch.cat(argmax, dim=1).cpu().numpy()


def agreement(a: np.ndarray, b: np.ndarray, where=None) -> float:
    same = a == b
    return float(same.mean() if where is None else same[where].mean())


def test_bf16_teacher_forced_top1(tmp_path):
    from conftest import build_tiny_model
    from kvport.core.model_info import resolve_model
    from kvport.models.llama import LlamaForCausalLM
    from kvport.models.loader import build_model

    path = str(tmp_path / "llama")
    build_tiny_model(path, "llama", seed=2, **dict(SHAPE, vocab_size=4096))
    torch.manual_seed(2)                        # re-saved with transformers' own init
    transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(path)).save_pretrained(path)
    info = resolve_model(path)
    block_size, prefill, length = 16, 128, 256
    spec = AttentionSpec(num_heads=info.num_heads, num_kv_heads=info.num_kv_heads,
                         head_size=info.head_size, block_size=block_size, dtype="bfloat16",
                         scale=info.head_size ** -0.5)
    backend = TritonPagedAttentionBackend(spec)
    model = build_model(info, LlamaForCausalLM, torch.bfloat16, backend, "cuda")
    sequences = prompts_for(info.vocab_size, [length] * 6, seed=3)
    ours_decode = teacher_forced_argmax(model, backend, sequences, prefill, block_size)
    ours_prefill = teacher_forced_argmax(model, backend, sequences, length, block_size)
    del model
    ids = torch.tensor(sequences, device="cuda")
    hf_bf16 = hf_model(path, torch.bfloat16)
    with torch.inference_mode():
        ref32 = hf_model(path, torch.float32)(ids).logits.float()
        ref16 = hf_bf16(ids).logits.float()
    hf16_decode = hf_teacher_forced_argmax(hf_bf16, ids, prefill)
    top2 = ref32.topk(2, dim=-1).values
    margin = (top2[..., 0] - top2[..., 1]).cpu().numpy()
    bf16_error = (ref16 - ref32).pow(2).mean(-1).sqrt().cpu().numpy()   # per position
    decisive = margin > 4 * bf16_error
    hf16, hf32 = ref16.argmax(-1).cpu().numpy(), ref32.argmax(-1).cpu().numpy()
    result = {
        "positions": int(hf16.size), "decisive_positions": int(decisive.sum()),
        # the bar, each kvport schedule against transformers on the same schedule
        "prefill_kvport_vs_hf_bf16_forward": agreement(ours_prefill, hf16),
        "decode_kvport_vs_hf_bf16_decode": agreement(ours_decode, hf16_decode),
        # across schedules, and transformers against itself across them
        "decode_kvport_vs_hf_bf16_forward": agreement(ours_decode, hf16),
        "hf_bf16_decode_vs_hf_bf16_forward": agreement(hf16_decode, hf16),
        "decode_kvport_vs_hf_bf16_forward_decisive": agreement(ours_decode, hf16, decisive),
        "prefill_kvport_vs_hf_bf16_forward_decisive": agreement(ours_prefill, hf16, decisive),
        "decode_kvport_vs_hf_fp32": agreement(ours_decode, hf32),
        "hf_bf16_vs_hf_fp32": agreement(hf16, hf32),
    }
    decode_cols = slice(prefill, None)
    result["decode_positions_only"] = {
        "kvport_vs_hf_bf16_decode": agreement(ours_decode[:, decode_cols],
                                              hf16_decode[:, decode_cols]),
        "kvport_vs_hf_bf16_forward": agreement(ours_decode[:, decode_cols], hf16[:, decode_cols]),
        "hf_decode_vs_hf_forward": agreement(hf16_decode[:, decode_cols], hf16[:, decode_cols]),
    }
    report("top1", result)
    assert decisive.mean() > 0.5, result
    assert result["prefill_kvport_vs_hf_bf16_forward_decisive"] >= 0.99, result
    assert result["decode_kvport_vs_hf_bf16_forward_decisive"] >= 0.99, result
    floor = result["hf_bf16_decode_vs_hf_bf16_forward"] - 0.015    # transformers vs itself
    for key in ("prefill_kvport_vs_hf_bf16_forward", "decode_kvport_vs_hf_bf16_decode",
                "decode_kvport_vs_hf_bf16_forward"):
        assert result[key] >= floor, (key, result)
    assert result["decode_kvport_vs_hf_fp32"] >= result["hf_bf16_vs_hf_fp32"] - 0.01, result


def test_platform_defaults_and_memory_sizing(llama_dir):
    from kvport import LLM
    from kvport.platforms.registry import PluginRegistry

    assert PluginRegistry().select_registration(None).name == "cuda"
    llm = LLM(model=llama_dir, gpu_memory_utilization=0.5, max_model_len=512)
    engine = llm.engine
    assert engine.platform.name == "cuda" and engine.config.model.dtype == "bfloat16"
    profile = engine.worker.memory_profile
    assert profile is not None and profile.peak_activation > 0 and profile.weights > 0
    kv_bytes = engine.num_blocks * engine.worker.bytes_per_block()
    assert 0 < kv_bytes <= profile.kv_cache
    used = torch.cuda.memory_reserved()
    report("memory", {"profile": profile.describe(), "num_blocks": engine.num_blocks,
                      "reserved_after_start": used, "total": profile.total})
    assert used <= 0.5 * profile.total, profile.describe()
    engine.shutdown()
