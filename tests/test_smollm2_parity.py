"""Greedy tokens identical to Hugging Face transformers on the real SmolLM2-135M-Instruct GGUF.

transformers dequantizes the same GGUF file into float32; kvport loads it through its own
GGUF reader. Every configuration must reproduce transformers' tokens exactly: one prompt at
a time, all 16 at once, prefix caching off, and a KV cache so small that preemption happens.
"""
import pytest
import torch

from kvport import LLM, SamplingParams

pytestmark = pytest.mark.slow

MAX_NEW = 64
RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "import numpy as np\nx = np.arange(10)\n",
    "The quick brown fox",
    "In 1969, the first humans",
    "A haiku about autumn:\n",
    "List of prime numbers: 2, 3, 5, 7,",
]
CHAT_QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "Write a short poem about the moon.",
    "What is 12 times 12?",
    "Give me three tips for learning Python.",
    "Translate 'good morning' into Spanish.",
]


@pytest.fixture(scope="module")
def prompts(smollm2_path):
    from kvport.core.model_info import resolve_model
    from kvport.core.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(resolve_model(smollm2_path))
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in CHAT_QUESTIONS]
    token_ids = [tokenizer.encode(p) for p in RAW_PROMPTS]
    token_ids += [tokenizer.encode(c, add_special_tokens=False) for c in chats]
    assert len(token_ids) == 16
    return token_ids


@pytest.fixture(scope="module")
def reference(smollm2_path, prompts):
    """transformers' greedy tokens (stopping at EOS like kvport does), one prompt at a time."""
    import os

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(smollm2_path),
                                                 gguf_file=os.path.basename(smollm2_path),
                                                 dtype=torch.float32)
    model.eval()
    outputs = []
    # One thread: batch-1 decoding gains little from two, and a single thread cannot stall
    # in an OpenMP barrier when the machine is busy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for ids in prompts:
                generated = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW,
                                           do_sample=False, pad_token_id=2)
                outputs.append(generated[0, len(ids):].tolist())
    finally:
        torch.set_num_threads(threads)
    return outputs


def params():
    return SamplingParams(temperature=0, max_tokens=MAX_NEW)


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(smollm2_path, device="cpu", dtype="float32", max_model_len=2048,
               kv_cache_memory="512MiB")


def test_reference_is_meaningful(reference):
    assert sum(len(r) for r in reference) > 16 * 20
    assert any(len(r) == MAX_NEW for r in reference)


def test_one_by_one(llm, prompts, reference):
    got = [llm.generate([p], params(), use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert got == reference


def test_all_at_once(llm, prompts, reference):
    assert token_ids(llm.generate(prompts, params())) == reference
    pool = llm.engine.kv_cache.pool
    assert pool.num_free_blocks == pool.num_blocks


def test_prefix_caching_off(smollm2_path, prompts, reference):
    llm = LLM(smollm2_path, device="cpu", dtype="float32", max_model_len=2048,
              kv_cache_memory="512MiB", enable_prefix_caching=False)
    assert token_ids(llm.generate(prompts, params())) == reference
    assert llm.engine.kv_cache.pool.num_cached_blocks == 0


def test_preemption(smollm2_path, prompts, reference):
    llm = LLM(smollm2_path, device="cpu", dtype="float32", max_model_len=256, num_blocks=24)
    assert token_ids(llm.generate(prompts, params())) == reference
    assert llm.engine.scheduler.num_preemptions > 0, "the KV cache was meant to run out"
    pool = llm.engine.kv_cache.pool
    assert pool.num_free_blocks == pool.num_blocks


def test_text_matches_the_known_answer(llm, prompts):
    out = llm.generate([prompts[10]], params())[0].outputs[0]
    assert "Paris" in out.text and out.finish_reason == "stop"
