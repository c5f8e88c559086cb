"""The JAX model runner: request state, one jitted model step and one jitted sampler per step.

The step function takes the parameters, the KV cache (donated: XLA reuses its buffer, so the
cache is updated in place across steps), the padded token inputs and the attention metadata,
and returns the logits of the rows that sample plus the new cache. It is compiled once per
StepShape, on first use or ahead of it (`precompile`, in parallel threads), and the
executables are kept per shape; the sampler compiles once per (rows, flags, padded list
sizes). Both sets of keys are kept (`compile_log`), so the number of compilations of a
workload can be read back and asserted.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from kvport.attention_backends.interface import CommonAttentionMetadata
from kvport.core.worker import ModelRunnerOutput, SampledLogprobs, SchedulerOutput
from kvport.core.worker_state import scheduled_states, update_request_states
from kvport_tpu.attention.ragged import ragged_attention
from kvport_tpu.buckets import ShapeBuckets, StepShape
from kvport_tpu.request_state import RequestState
from kvport_tpu.sampler import SamplingBatch, sample_jit
from kvport_tpu.step_inputs import build_step_inputs


@dataclass
class CompileLog:
    """The distinct shapes each jitted function has seen (one XLA compilation each)."""
    step_shapes: set[StepShape] = field(default_factory=set)
    sampler_keys: set[tuple] = field(default_factory=set)

    @property
    def total(self) -> int:
        return len(self.step_shapes) + len(self.sampler_keys)


class JaxModelRunner:
    """Holds the parameters, the KV cache and every request's state on one JAX device."""

    def __init__(self, model, params: dict, attn_backend, kv_cache: jnp.ndarray,
                 rope: tuple[jnp.ndarray, jnp.ndarray], buckets: ShapeBuckets, block_size: int,
                 vocab_size: int, seed: int):
        self.model = model
        self.params = params
        self.attn_backend = attn_backend
        self.kv_cache = kv_cache
        self.rope = rope
        self.buckets = buckets
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.rng = np.random.default_rng(seed)
        self.states: dict[str, RequestState] = {}
        self.compile_log = CompileLog()
        tile_fn = attn_backend.tile_fn()
        self._step = jax.jit(self._make_step(tile_fn), donate_argnums=(1,))
        self._executables: dict[StepShape, object] = {}

    def _make_step(self, tile_fn):
        """The pure step function (jitted in __init__) closing over the model and backend."""
        model, backend = self.model, self.attn_backend

        def step(params, kv_cache, rope, input_ids, positions, attn_md, logits_rows):
            cos, sin = rope[0][positions], rope[1][positions]

            def attend(q, k, v, cache, layer):
                return ragged_attention(q, k, v, cache, layer, attn_md, backend.prefill_tile,
                                        tile_fn, backend.kv_dtype)
            hidden, kv_cache = model.forward(params, kv_cache, input_ids, cos, sin, attend)
            return model.compute_logits(params, hidden[logits_rows]), kv_cache
        return step

    # ---------------------------------------------------------------------------- state
    def update_states(self, scheduler_output: SchedulerOutput) -> None:
        """Drop freed requests, add new ones, extend block tables of the others."""
        update_request_states(self.states, scheduler_output, RequestState.from_new_request)

    # ----------------------------------------------------------------------------- step
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """One engine step: state updates, the model on the padded batch, then sampling."""
        self.update_states(scheduler_output)
        if scheduler_output.is_empty:
            return ModelRunnerOutput()
        _, states, counts = scheduled_states(self.states, scheduler_output)
        inputs = build_step_inputs(states, counts, self.block_size, self.buckets)
        logits = self.run_model(inputs.shape, inputs.input_ids, inputs.positions,
                                self.attn_backend.build_metadata(inputs.attention,
                                                                 shape=inputs.shape),
                                inputs.logits_rows)
        for state, count in zip(states, counts):
            state.num_computed_tokens += count
        if not inputs.sampling_states:
            return ModelRunnerOutput()
        return self.sample(logits, inputs.sampling_states, inputs.shape.num_seqs)

    def run_model(self, shape: StepShape, input_ids, positions, attn_md, logits_rows):
        """One compiled forward pass; returns the [S, V] float32 logits (on device)."""
        args = (self.params, self.kv_cache, self.rope, input_ids, positions, attn_md,
                logits_rows)
        executable = self._executables.get(shape)
        if executable is None:
            executable = self._compile(shape, args)
        logits, self.kv_cache = executable(*args)
        return logits

    def _compile(self, shape: StepShape, args) -> object:
        executable = self._step.lower(*args).compile()
        self._executables[shape] = executable
        self.compile_log.step_shapes.add(shape)
        return executable

    def precompile(self, shapes: list[StepShape], max_workers: int | None = None) -> float:
        """Compile the step for `shapes` ahead of use, several at a time (XLA compiles outside
        the GIL). Returns the wall seconds it took."""
        start = time.perf_counter()
        todo = [s for s in dict.fromkeys(shapes) if s not in self._executables]
        with ThreadPoolExecutor(max_workers) as pool:
            list(pool.map(lambda shape: self._compile(shape, self._dummy_args(shape)), todo))
        return time.perf_counter() - start

    def _dummy_args(self, shape: StepShape):
        """Step arguments of `shape` with no request in them (all padding)."""
        empty = CommonAttentionMetadata(np.zeros(1, np.int32), np.zeros(0, np.int32),
                                        np.zeros((0, 0), np.int32), np.zeros(0, np.int64))
        zeros = np.zeros(shape.num_tokens, np.int32)
        return (self.params, self.kv_cache, self.rope, zeros, zeros,
                self.attn_backend.build_metadata(empty, shape=shape),
                np.zeros(shape.num_seqs, np.int32))

    def sample(self, logits, states: list[RequestState], num_rows: int) -> ModelRunnerOutput:
        """Sample one token for each of `states` (the first rows of `logits`) and record it."""
        rows = [(s.sampling_params, s.seed, s.prompt_token_ids, s.output_token_ids)
                for s in states]
        batch, flags = SamplingBatch.build(rows, num_rows, self.vocab_size, self.rng)
        self.compile_log.sampler_keys.add(
            (num_rows, flags, batch.prompt_tokens.shape[1], batch.output_tokens.shape[1],
             batch.min_tokens_rows.shape[0]))
        sampled, logprobs = sample_jit(logits, batch, flags)
        n = len(states)
        token_ids = np.asarray(sampled)[:n].tolist()
        for state, token_id in zip(states, token_ids):
            state.output_token_ids.append(token_id)
        return ModelRunnerOutput(req_ids=[s.req_id for s in states],
                                 sampled_token_ids=token_ids,
                                 logprobs=self._logprobs(logprobs, states))

    @staticmethod
    def _logprobs(logprobs, states: list[RequestState]) -> SampledLogprobs | None:
        if logprobs is None:
            return None
        n = len(states)
        width = 1 + max(s.sampling_params.logprobs or 0 for s in states)
        ids, lps, ranks = (np.asarray(a)[:n, :width] for a in logprobs)
        return SampledLogprobs(token_ids=ids.astype(np.int64), logprobs=lps.astype(np.float32),
                               ranks=ranks.astype(np.int64))
