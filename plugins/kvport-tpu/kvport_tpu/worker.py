"""JaxWorker: the Worker of the `tpu` and `xla` platforms.

Same contract as the torch worker (kvport/core/worker.py): plain data in, sampled tokens out.
Weights come from the same checkpoints, read without torch (kvport/core/checkpoint.py); the
KV cache is one device array for all layers, donated to every step.
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp

from kvport.attention_backends.interface import AttentionSpec, UnsupportedAttentionConfig
from kvport.core.checkpoint import iter_numpy_weights
from kvport.core.worker import ModelRunnerOutput, SchedulerOutput, Worker
from kvport.platforms.interface import DTYPE_BYTES
from kvport_tpu import memory
from kvport_tpu.attention.backends import JaxRaggedBackend
from kvport_tpu.buckets import ShapeBuckets
from kvport_tpu.models.layers import rope_tables
from kvport_tpu.models.params import load_params
from kvport_tpu.runner import JaxModelRunner

logger = logging.getLogger(__name__)

JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class JaxWorker(Worker):
    """Loads a JAX model, owns its KV cache, runs steps through JaxModelRunner."""

    def __init__(self, config, model_info, platform, registry):
        super().__init__(config, model_info, platform, registry)
        self.dtype = JAX_DTYPES[config.model.dtype]
        self.device = None
        self.model = None
        self.params = None
        self.attn_backend = None
        self.runner: JaxModelRunner | None = None

    def init_device(self) -> None:
        self.device = self.platform.device()

    def attention_spec(self) -> AttentionSpec:
        info = self.model_info
        return AttentionSpec(num_heads=info.num_heads, num_kv_heads=info.num_kv_heads,
                             head_size=info.head_size, block_size=self.config.cache.block_size,
                             dtype=self.config.model.dtype, scale=info.head_size ** -0.5,
                             sliding_window=info.sliding_window)

    def load_model(self) -> None:
        backend_name = (self.config.device.attention_backend
                        or self.platform.default_attention_backend(self.config))
        backend_class = self.registry.attention_backend_class(backend_name,
                                                              self.platform.device_type)
        if not issubclass(backend_class, JaxRaggedBackend):
            raise UnsupportedAttentionConfig(
                f"attention backend {backend_name!r} is not a JAX backend; the "
                f"{self.platform.name} platform runs jax_ragged or pallas_ragged")
        self.attn_backend = backend_class(self.attention_spec())
        model_class = self.registry.model_class(self.model_info.architecture, framework="jax")
        self.model = model_class(self.model_info.hf_config)
        self.params = self.load_params()

    def load_params(self) -> dict:
        """The parameter pytree on the device (subclasses may substitute random weights)."""
        return load_params(self.model.spec, iter_numpy_weights(self.model_info), self.dtype,
                           self.device)

    def bytes_per_block(self) -> int:
        info = self.model_info
        page = self.attn_backend.page_bytes(self.config.cache.block_size, info.num_kv_heads,
                                            info.head_size, DTYPE_BYTES[self.config.model.dtype])
        return page * info.num_layers

    def activation_reserve_bytes(self) -> int:
        """A generous bound on one step's temporaries: a few [tokens, width] float32 buffers
        and the [sequences, vocab] logits and sampler arrays."""
        sched, spec = self.config.scheduler, self.model.spec
        width = max(spec.hidden_size, 2 * spec.intermediate_size,
                    spec.q_size + 2 * spec.kv_size)
        return 4 * (8 * sched.max_num_batched_tokens * width
                    + 8 * sched.max_num_seqs * spec.vocab_size)

    def determine_available_kv_blocks(self) -> int:
        if self.config.cache.kv_cache_memory:
            budget = int(self.config.cache.kv_cache_memory)
        else:
            budget = memory.kv_cache_budget(self.device, self.config.cache.gpu_memory_utilization,
                                            self.activation_reserve_bytes())
        return max(budget // self.bytes_per_block(), 0)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        info, cache = self.model_info, self.config.cache
        shape = (info.num_layers,) + self.attn_backend.kv_cache_shape(
            num_blocks, cache.block_size, info.num_kv_heads, info.head_size)
        kv_cache = jnp.zeros(shape, self.attn_backend.cache_storage_dtype(),
                             device=self.device)
        max_len = self.config.model.max_model_len
        cos, sin = rope_tables(self.model.spec.rope, info.head_size, max_len)
        rope = jax.device_put((cos, sin), self.device)
        sched = self.config.scheduler
        buckets = ShapeBuckets(max_tokens=sched.max_num_batched_tokens,
                               max_seqs=sched.max_num_seqs,
                               max_blocks=-(-max_len // cache.block_size),
                               prefill_tile=self.attn_backend.prefill_tile)
        self.runner = JaxModelRunner(self.model, self.params, self.attn_backend, kv_cache, rope,
                                     buckets, cache.block_size, info.vocab_size,
                                     self.config.model.seed)
        logger.info("JAX worker on %s: KV cache %s %s (stored as %s); at most %d step shapes",
                    self.device, shape, jnp.dtype(self.dtype).name, kv_cache.dtype.name,
                    buckets.max_shapes())

    def warm_up(self) -> None:
        """On an accelerator, compile the decode-only step shapes ahead, all cores at once: a
        server spends most of its steps in them. Other shapes (steps with prompts) compile on
        first use. On JAX's CPU backend nothing is compiled ahead: a small machine would take
        minutes, and tests start many engines."""
        if self.device.platform == "cpu":
            return
        shapes = self.runner.buckets.decode_shapes()
        seconds = self.runner.precompile(shapes, max_workers=os.cpu_count())
        logger.info("compiled %d decode step shapes in %.1f s", len(shapes), seconds)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(scheduler_output)

    def shutdown(self) -> None:
        self.runner = None
        self.params = None
        self.model = None
