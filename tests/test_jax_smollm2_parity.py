"""Greedy tokens identical to Hugging Face transformers (float32) on the real
SmolLM2-135M-Instruct GGUF, through kvport-tpu's JAX worker on JAX's CPU backend.

Eight of tests/test_smollm2_parity.py's prompts (4 raw, 4 chat), 64 new tokens, run
together. The weights are read by kvport's torch-free GGUF reader. The transformers reference
is computed here, one prompt at a time as in the torch parity test, for these eight prompts
only (it dominates the run time). Preemption, chunking and prefix caching through the JAX
worker are checked on tiny models (tests/test_jax_engine.py), which is cheaper in CI.
"""
import os

import pytest
import torch

from kvport import LLM
from test_smollm2_parity import CHAT_QUESTIONS, MAX_NEW, RAW_PROMPTS, params, token_ids

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prompts(smollm2_path):
    from kvport.core.model_info import resolve_model
    from kvport.core.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(resolve_model(smollm2_path))
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True)
             for q in CHAT_QUESTIONS[:4]]
    return ([tokenizer.encode(p) for p in RAW_PROMPTS[:4]]
            + [tokenizer.encode(c, add_special_tokens=False) for c in chats])


@pytest.fixture(scope="module")
def reference(smollm2_path, prompts):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(smollm2_path),
                                                 gguf_file=os.path.basename(smollm2_path),
                                                 dtype=torch.float32).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            return [model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                                   pad_token_id=2)[0, len(ids):].tolist() for ids in prompts]
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(smollm2_path, device="xla", dtype="float32", max_model_len=2048,
               kv_cache_memory="512MiB")


def test_reference_is_meaningful(reference):
    assert len(reference) == 8 and sum(map(len, reference)) > 8 * 20
    assert any(len(r) == MAX_NEW for r in reference)


def test_eight_prompts_together(llm, prompts, reference):
    assert token_ids(llm.generate(prompts, params(), use_tqdm=False)) == reference
    pool = llm.engine.kv_cache.pool
    assert pool.num_free_blocks == pool.num_blocks
    assert llm.engine.worker.runner.compile_log.total <= 8


def test_text_matches_the_known_answer(llm, prompts):
    out = llm.generate([prompts[4]], params(), use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text and out.finish_reason == "stop"
