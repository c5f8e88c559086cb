"""How far `--quantization int8` moves a model: teacher-forced top-1 agreement with float32.

transformers' float32 model (loaded from the same checkpoint, e.g. the embedded GGUF) samples
a continuation for each prompt; the float32 model and a copy whose every nn.Linear is replaced
by kvport's Int8DynamicLinear then score the same token sequences, and we count the positions
where their argmax agrees. Sampled text (temperature 0.8) has more near-ties than greedy text,
so this is a demanding measure.

    python -m kvport.bench.quant_fidelity [MODEL] [--new-tokens 150]
"""
from __future__ import annotations

import argparse
import copy
import os

PROMPTS = [
    "The history of the Roman Empire spans more than a thousand years, beginning with",
    "def quicksort(arr):\n    if len(arr) <= 1:\n        return arr\n",
    "Photosynthesis is the process by which green plants",
    "<|im_start|>user\nWrite a short story about a robot learning to paint.<|im_end|>\n"
    "<|im_start|>assistant\n",
]


def _load(model: str | None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvport.core.model_info import resolve_model
    info = resolve_model(model)
    if info.format == "gguf":
        directory, name = os.path.dirname(info.path), os.path.basename(info.path)
        kwargs = {"gguf_file": name}
    else:
        directory, kwargs = info.path, {}
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs).eval()
    return hf, AutoTokenizer.from_pretrained(directory, **kwargs)


def _quantized_copy(model):
    from torch import nn

    from kvport.models.quantization import Int8DynamicLinear
    quantized = copy.deepcopy(model)
    for module in list(quantized.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8DynamicLinear.from_linear(child))
    return quantized


def main(argv: list[str] | None = None) -> None:
    import torch
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--new-tokens", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model, tokenizer = _load(args.model)
    with torch.inference_mode():
        sequences = [model.generate(tokenizer(p, return_tensors="pt").input_ids,
                                    max_new_tokens=args.new_tokens, do_sample=True,
                                    temperature=0.8, top_p=0.95,
                                    pad_token_id=tokenizer.eos_token_id or 0)
                     for p in PROMPTS]
        quantized = _quantized_copy(model)
        agree = total = 0
        for seq in sequences:
            ref = model(seq).logits[0].argmax(-1)
            got = quantized(seq).logits[0].argmax(-1)
            agree += int((ref == got).sum())
            total += ref.numel()
    print(f"int8 vs float32 teacher-forced top-1 agreement: {agree / total:.4f} "
          f"({agree}/{total} positions, {len(PROMPTS)} sampled sequences)")


if __name__ == "__main__":
    main()
