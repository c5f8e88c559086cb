"""The Hugging Face transformers peer for `bench throughput`: static batching with `generate`.

This is the baseline vLLM measures itself against: fixed batches, left padding, greedy, every
sequence of a batch decoded to the batch's longest output. Throughput counts only the tokens
each request asked for, so it is comparable with kvport's output tok/s on the same requests.
"""
from __future__ import annotations

import time
from typing import Any

_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def load_hf_model(model_dir: str, gguf_file: str | None, dtype: str, device: str):
    """transformers model from an HF directory or a GGUF (dequantized to `dtype`)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, _TORCH_DTYPES.get(dtype, "float32"))
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, **kwargs)
    return model.to(device).eval()


def _batch_tensors(prompts: list[list[int]], pad_id: int, device: str):
    """Left padding: every prompt ends at the same column, so generation appends after it."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def _generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int, device: str):
    import torch
    from transformers import GenerationConfig

    ids, mask = _batch_tensors(prompts, pad_id, device)
    # min_new_tokens == max_new_tokens: EOS is masked out, the static equivalent of ignore_eos.
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=pad_id)
    with torch.inference_mode():
        return model.generate(ids, attention_mask=mask, generation_config=config)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def run_hf_static(model_dir: str, gguf_file: str | None, dtype: str, device: str,
                  requests: list[tuple[list[int], int]], batch_size: int) -> dict[str, Any]:
    """Run `requests` ((prompt ids, output length) pairs) in order, `batch_size` at a time."""
    import transformers

    model = load_hf_model(model_dir, gguf_file, dtype, device)
    pad_id = model.generation_config.pad_token_id
    if pad_id is None:
        pad_id = 0   # any id works: padded positions are masked out
    _generate(model, [requests[0][0][:16]], 4, pad_id, device)   # warm-up, not timed
    _sync(device)
    start = time.perf_counter()
    generated = 0
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        _generate(model, [p for p, _ in batch], max(n for _, n in batch), pad_id, device)
        generated += sum(n for _, n in batch)
    _sync(device)
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(p) for p, _ in requests)
    return {"peer": "hf_static", "transformers": transformers.__version__,
            "batch_size": batch_size, "dtype": dtype, "device": device,
            "elapsed_s": elapsed, "output_tokens": generated,
            "output_throughput": generated / elapsed,
            "total_throughput": (generated + prompt_tokens) / elapsed}
