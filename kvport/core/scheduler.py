"""Token-budget continuous batching, vLLM v1 style: no prefill or decode phases.

Each step hands out at most `max_num_batched_tokens` tokens: first to running requests in
arrival order (one token for a decoding request, a chunk for one still prefilling), then to
waiting requests while sequence slots and budget remain. When blocks run out, the most
recently admitted running request is preempted by recompute: its blocks go back to the pool
and it returns to the front of the queue.

With async scheduling the engine schedules step N+1 before it has seen step N's sampled
tokens. A request that samples in a step gets a pending token (`num_pending_tokens`), which
the next step may already take as its input: the worker feeds it from device memory. Tokens
become known in `update_from_output`. A request is not scheduled past its length limits
counting pending tokens, and a preempted request is not resumed while one is pending (its
recompute needs every token).
"""
from __future__ import annotations

from collections import deque

from kvport.core.config import SchedulerConfig
from kvport.core.kv_cache_manager import KVCacheManager
from kvport.core.request import Request, RequestStatus
from kvport.core.worker import (CachedRequestData, ModelRunnerOutput, NewRequestData,
                                SchedulerOutput)


class Scheduler:
    """Decides, step by step, which tokens of which requests the worker computes."""

    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager, max_model_len: int,
                 async_scheduling: bool = False):
        self.config = config
        self.async_scheduling = async_scheduling
        self.kv_cache = kv_cache
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._on_worker: set[str] = set()      # requests whose state the worker holds
        self._freed_ids: list[str] = []        # to tell the worker at the next step
        self.num_preemptions = 0

    # ----------------------------------------------------------------- requests in and out
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_request(self, request: Request, status: RequestStatus,
                       stop_reason: int | str | None = None) -> None:
        """End a request (stop, length or abort) and give back its blocks."""
        if request.is_finished:
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status, request.stop_reason = status, stop_reason
        self._release(request)
        del self.requests[request.request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # ----------------------------------------------------------------------- one step
    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput(freed_req_ids=self._freed_ids)
        self._freed_ids = []
        budget = self.config.max_num_batched_tokens
        budget, preempted = self._schedule_running(output, budget)
        if not preempted:
            self._schedule_waiting(output, budget)
        return output

    def _schedule_running(self, output: SchedulerOutput, budget: int) -> tuple[int, bool]:
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if self._pending_reach_limit(request):
                index += 1          # its last token is in flight: nothing more to compute
                continue
            num_new = min(request.num_tokens + request.num_pending_tokens
                          - request.num_computed_tokens, budget)
            new_block_ids = self.kv_cache.allocate_slots(request, num_new)
            while new_block_ids is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
                new_block_ids = self.kv_cache.allocate_slots(request, num_new)
            if new_block_ids is None:
                break
            output.cached_requests.append(CachedRequestData(
                request.request_id, new_block_ids, request.num_computed_tokens))
            self._commit(output, request, num_new)
            budget -= num_new
            index += 1
        return budget, preempted

    def _schedule_waiting(self, output: SchedulerOutput, budget: int) -> None:
        deferred: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if self._must_wait_for_leader(request) or request.num_pending_tokens:
                deferred.append(self.waiting.popleft())
                continue
            computed = self.kv_cache.find_computed_blocks(request)
            num_computed = len(computed) * self.kv_cache.block_size
            num_new = min(request.num_tokens - num_computed, budget)
            if self.kv_cache.allocate_slots(request, num_new, computed) is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_computed
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_computed
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            output.new_requests.append(NewRequestData(
                req_id=request.request_id,
                prompt_token_ids=request.prompt_token_ids,
                output_token_ids=list(request.output_token_ids),
                sampling_params=request.sampling_params,
                sample_seed=request.sampling_params.sample_seed(request.sample_index),
                block_ids=self.kv_cache.block_ids(request.request_id),
                num_computed_tokens=num_computed))
            self._on_worker.add(request.request_id)
            self._commit(output, request, num_new)
            budget -= num_new
        self.waiting.extendleft(reversed(deferred))

    @staticmethod
    def _must_wait_for_leader(request: Request) -> bool:
        """A later sample waits while its leader is still computing their shared prompt."""
        leader = request.prompt_leader
        return (leader is not None and not leader.is_finished and not leader.prompt_computed
                and not request.output_token_ids)

    def _pending_reach_limit(self, request: Request) -> bool:
        """With tokens pending, whether they already take the request to max_tokens or
        max_model_len (so another step would compute a token that is thrown away)."""
        pending = request.num_pending_tokens
        if not pending:
            return False
        max_tokens = request.sampling_params.max_tokens
        return ((max_tokens is not None
                 and len(request.output_token_ids) + pending >= max_tokens)
                or request.num_tokens + pending >= self.max_model_len)

    def _commit(self, output: SchedulerOutput, request: Request, num_new: int) -> None:
        output.num_scheduled_tokens[request.request_id] = num_new
        request.num_computed_tokens += num_new
        if (self.async_scheduling and request.num_computed_tokens
                >= request.num_tokens + request.num_pending_tokens):
            request.num_pending_tokens += 1      # it samples in this step

    def _preempt(self, request: Request) -> None:
        self._release(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _release(self, request: Request) -> None:
        self.kv_cache.free(request)
        if request.request_id in self._on_worker:
            self._on_worker.discard(request.request_id)
            self._freed_ids.append(request.request_id)

    # ------------------------------------------------------------------- after a step
    def update_from_output(self, model_output: ModelRunnerOutput) -> list[Request]:
        """Append sampled tokens and finish requests that hit EOS, a stop token or a length
        limit. Returns the requests that received a token (finished ones included)."""
        updated = []
        for req_id, token_id in zip(model_output.req_ids, model_output.sampled_token_ids):
            request = self.requests.get(req_id)
            if request is None:
                continue  # finished or aborted while the step ran: the token is dropped
            if self.async_scheduling:
                request.num_pending_tokens -= 1
            # A request preempted while its token was in flight (async) keeps the token.
            request.output_token_ids.append(token_id)
            updated.append(request)
            status, reason = self._check_stop(request, token_id)
            if status is not None:
                self.finish_request(request, status, reason)
        return updated

    def _check_stop(self, request: Request, token_id: int) -> tuple[RequestStatus | None, int | None]:
        params = request.sampling_params
        num_output = len(request.output_token_ids)
        if num_output >= params.min_tokens:
            if not params.ignore_eos and token_id in params.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED, None
            if token_id in params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED, token_id
        if (params.max_tokens is not None and num_output >= params.max_tokens) \
                or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH, None
        return None, None
