"""LLMEngine: add_request / step / abort over the scheduler, KV cache manager and a Worker.

Hardware-agnostic: the engine picks a Platform through the plugin registry, and that
platform's Worker does everything device-side. Imports no torch and no jax.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

from kvport.core.config import ConfigError, EngineConfig
from kvport.core.kv_cache_manager import KVCacheManager
from kvport.core.model_info import ModelInfo, resolve_model
from kvport.core.output_processor import (RequestGroup, apply_token, new_sample_state,
                                          row_index)
from kvport.core.request import Request, RequestDelta, RequestOutput, RequestStatus
from kvport.core.sampling_params import InvalidRequestError, SamplingParams
from kvport.core.scheduler import Scheduler
from kvport.core.tokenizer import eos_token_ids, load_tokenizer
from kvport.core.worker import CompletedOutput, ModelRunnerOutput

logger = logging.getLogger(__name__)


class EngineOverloadedError(RuntimeError):
    """The waiting queue is at its configured limit; retry later (HTTP 503)."""


@dataclass
class EngineSnapshot:
    """Engine state at one moment; crosses process boundaries, so plain data only."""
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_steps: int = 0


@dataclass
class EngineStats:
    """Counters the engine keeps about itself (also the source of /metrics later)."""
    num_steps: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    max_kv_waste: float = 0.0
    kv_waste_history: list[float] = field(default_factory=list)
    record_history: bool = False


class LLMEngine:
    """Owns one model on one platform and serves requests step by step."""

    def __init__(self, config: EngineConfig, registry=None):
        from kvport.core.executor import build_worker
        from kvport.platforms.registry import PluginRegistry

        self.config = config
        self.registry = registry or PluginRegistry()
        self.platform = self.registry.select_platform(config.device.device)
        self.platform.check_and_update_config(config)
        self.model_info: ModelInfo = resolve_model(config.model.model)
        self._check_architecture()
        self.max_model_len = self._resolve_max_model_len()
        config.model.max_model_len = self.max_model_len
        config.model.dtype = self.platform.resolve_dtype(config, self.model_info.checkpoint_dtype)
        self.tokenizer = load_tokenizer(self.model_info, config.model.tokenizer)
        self.eos_token_ids = eos_token_ids(self.model_info, self.tokenizer)
        # the platform's worker, or one process per rank behind it (tensor parallelism)
        self.worker = build_worker(config, self.model_info, self.platform, self.registry)
        self.num_blocks = self._start_worker()
        self.kv_cache = KVCacheManager(self.num_blocks, config.cache.block_size,
                                       config.cache.enable_prefix_caching)
        self.async_scheduling = self._resolve_async_scheduling()
        self.scheduler = Scheduler(config.scheduler, self.kv_cache, self.max_model_len,
                                   async_scheduling=self.async_scheduling)
        self._in_flight = None          # the launched step whose output is not processed yet
        self._last_step_idle = False
        self.stats = EngineStats()
        self._groups: dict[str, RequestGroup] = {}
        self._sample_to_group: dict[str, RequestGroup] = {}
        self._ids = itertools.count()

    # -------------------------------------------------------------------- start-up
    def _check_architecture(self) -> None:
        """Fail before loading anything when no plugin implements the architecture."""
        from kvport.platforms.registry import UnsupportedModelError

        supported = sorted({m.architecture for m in self.registry.models()})
        if self.model_info.architecture not in supported:
            raise UnsupportedModelError(
                f"unsupported model architecture {self.model_info.architecture!r} "
                f"({self.model_info.path}); supported: {', '.join(supported)}")

    def _resolve_max_model_len(self) -> int:
        model_limit = self.model_info.max_position_embeddings
        wanted = self.config.model.max_model_len
        if wanted is None:
            return model_limit
        if wanted > model_limit:
            raise ConfigError(f"max_model_len {wanted} exceeds the model's limit of "
                              f"{model_limit} positions (max_position_embeddings)")
        return wanted

    def _resolve_async_scheduling(self) -> bool:
        """`async_scheduling=None` follows the worker's preference. Any worker can be run
        asynchronously: the default `execute_model_async` meets the contract by finishing the
        step before it returns."""
        wanted = self.config.scheduler.async_scheduling
        return self.worker.prefers_async_scheduling() if wanted is None else bool(wanted)

    def _start_worker(self) -> int:
        self.worker.init_device()
        self.worker.load_model()
        num_blocks = self.config.cache.num_blocks or self.worker.determine_available_kv_blocks()
        block_size = self.config.cache.block_size
        if num_blocks * block_size < self.max_model_len:
            raise ConfigError(
                f"the KV cache holds {num_blocks} blocks x {block_size} tokens = "
                f"{num_blocks * block_size} tokens, fewer than max_model_len "
                f"{self.max_model_len}: lower max_model_len or give the cache more memory "
                "(kv_cache_memory / gpu_memory_utilization)")
        self.worker.initialize_kv_cache(num_blocks)
        self.worker.warm_up()
        return num_blocks

    # ------------------------------------------------------------------- requests
    def tokenize_prompt(self, prompt: str | list[int] | None) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, list(self.tokenizer.encode(prompt))
        if prompt is None:
            raise InvalidRequestError("prompt is required", param="prompt")
        return None, [int(t) for t in prompt]

    def validate_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError when the prompt cannot be served at all."""
        if not token_ids:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        vocab = self.model_info.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt token id {bad} is outside the vocabulary "
                                      f"[0, {vocab})", param="prompt")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt is {len(token_ids)} tokens, which leaves no room to generate within "
                f"max_model_len {self.max_model_len}", param="prompt")

    def add_request(self, request_id: str | None, prompt: str | list[int] | None,
                    params: SamplingParams | None = None) -> str:
        """Queue a request; returns its id. Raises InvalidRequestError for bad input."""
        params = params or SamplingParams()
        params.validate()
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self._groups:
            raise InvalidRequestError(f"request id {request_id!r} is already in use",
                                      param="request_id")
        limit = self.config.scheduler.max_waiting_requests
        if limit is not None and len(self.scheduler.waiting) >= limit:
            raise EngineOverloadedError(f"the waiting queue is full ({limit} requests waiting); "
                                        "retry later")
        text, token_ids = self.tokenize_prompt(prompt)
        self.validate_prompt(token_ids, params)
        params.eos_token_ids = self.eos_token_ids
        group = RequestGroup(request_id, text, token_ids)
        leader = None
        for index in range(params.n):
            request = Request(f"{request_id}#{index}", token_ids, params, sample_index=index,
                              prompt_leader=leader)
            leader = leader or request
            group.samples.append(new_sample_state(request, self.tokenizer))
            self._sample_to_group[request.request_id] = group
            self.scheduler.add_request(request)
        self._groups[request_id] = group
        self.stats.num_prompt_tokens += len(token_ids)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks. Returns False if it is not known."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return False
        for sample in group.samples:
            self.scheduler.finish_request(sample.request, RequestStatus.FINISHED_ABORTED)
            self._sample_to_group.pop(sample.request.request_id, None)
        return True

    def abort_all(self) -> None:
        """Abort every request (shutdown)."""
        for request_id in list(self._groups):
            self.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._groups)

    # ----------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one step; the full output so far of every request that moved."""
        return [self._emit(group, group.to_output()) for group in self._step()]

    def step_deltas(self) -> list[RequestDelta]:
        """Run one step; only what is new since the last call, for streaming."""
        return [self._emit(group, group.take_delta()) for group in self._step()]

    def step_finished(self) -> list[RequestOutput]:
        """Run one step; the final output of every request that finished in it (offline
        generation: no per-step output is built, and text is decoded once per request)."""
        return [self._emit(group, group.to_output()) for group in self._step()
                if group.finished]

    @property
    def last_step_idle(self) -> bool:
        """True when the last step neither ran the model nor received a result: with requests
        still unfinished, nothing can be scheduled (a caller looping on step() must stop)."""
        return self._last_step_idle

    def _step(self) -> list[RequestGroup]:
        """Schedule, run the worker once, and return the request groups that moved.

        With async scheduling, this step's batch is launched first and the previous step's
        output is processed while the device runs it: results arrive one step late, and a
        request that stops (EOS, stop string) has computed one token more, which is dropped.
        """
        scheduler_output = self.scheduler.schedule()
        launched = None
        if not scheduler_output.is_empty:
            self._record_kv_waste()
            if self.async_scheduling:
                launched = self.worker.execute_model_async(scheduler_output)
            else:
                launched = CompletedOutput(self.worker.execute_model(scheduler_output))
            self.stats.num_steps += 1
        elif scheduler_output.freed_req_ids:   # the worker must still drop their state
            self.worker.execute_model(scheduler_output)
        if self.async_scheduling:
            previous, self._in_flight = self._in_flight, launched
        else:
            previous = launched
        self._last_step_idle = launched is None and previous is None
        if previous is None:
            return []
        return self._process_output(previous.result())

    def _process_output(self, model_output: ModelRunnerOutput) -> list[RequestGroup]:
        """Give the sampled tokens to the scheduler, then detokenize and apply stop strings."""
        updated = self.scheduler.update_from_output(model_output)
        self.stats.num_generation_tokens += len(updated)
        rows = row_index(model_output.req_ids)
        touched: dict[str, RequestGroup] = {}
        for request in updated:
            group = self._sample_to_group[request.request_id]
            sample = group.samples[request.sample_index]
            stop = apply_token(sample, request.output_token_ids[-1], model_output.logprobs,
                               rows.get(request.request_id))
            if stop is not None and not request.is_finished:
                self.scheduler.finish_request(request, RequestStatus.FINISHED_STOPPED, stop)
            if request.is_finished:
                sample.detokenizer.finish()
            touched[group.request_id] = group
        return list(touched.values())

    def _emit(self, group: RequestGroup, output):
        if group.finished:
            del self._groups[group.request_id]
            for sample in group.samples:
                self._sample_to_group.pop(sample.request.request_id, None)
        return output

    def snapshot(self) -> EngineSnapshot:
        """The gauges and counters /metrics shows, as plain data."""
        pool = self.kv_cache.pool
        return EngineSnapshot(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=pool.usage(), prefix_cache_queries=pool.num_cache_queries,
            prefix_cache_hits=pool.num_cache_hits, num_preemptions=self.scheduler.num_preemptions,
            num_prompt_tokens=self.stats.num_prompt_tokens,
            num_generation_tokens=self.stats.num_generation_tokens,
            num_steps=self.stats.num_steps)

    def _record_kv_waste(self) -> None:
        allocated = self.kv_cache.pool.num_used_blocks * self.kv_cache.block_size
        if not allocated:
            return
        waste = self.kv_cache.kv_waste_slots(self.scheduler.running) / allocated
        self.stats.max_kv_waste = max(self.stats.max_kv_waste, waste)
        if self.stats.record_history:
            self.stats.kv_waste_history.append(waste)

    def shutdown(self) -> None:
        self.worker.shutdown()
