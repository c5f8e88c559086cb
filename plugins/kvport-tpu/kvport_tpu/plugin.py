"""Entry point of kvport-tpu: two platforms, two attention backends, the JAX model families.

* `tpu`: Google TPUs through JAX and libtpu, with the Pallas ragged paged attention kernel.
* `xla`: the same worker on whatever backend JAX has (CPU, CUDA), with the pure jax.numpy
  attention. A development platform: it is never preferred over a native plugin, so its
  priority puts it after the CPU plugin; select it with `--device xla`.

Cheap to import: no jax here. jax is imported once one of the platforms is selected.
"""
from __future__ import annotations

from kvport.platforms.hookspecs import hookimpl
from kvport_tpu.detect import tpu_is_available, xla_is_available

# The plugin API versions this plugin supports (kvport.platforms.api_version).
KVPORT_PLUGIN_API = ">=1.0,<2"

JAX_MODELS = {
    "LlamaForCausalLM": "kvport_tpu.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "kvport_tpu.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "kvport_tpu.models.llama:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "kvport_tpu.models.llama:Qwen3ForCausalLM",
}


@hookimpl
def kvport_register_platforms(register):
    """tpu (priority 30) and xla (110: after the CPU plugin's 100, explicit use only)."""
    register(name="tpu", device_type="tpu", platform_class="kvport_tpu.platform:TpuPlatform",
             is_available=tpu_is_available, priority=30, framework="jax")
    register(name="xla", device_type="xla", platform_class="kvport_tpu.platform:XlaPlatform",
             is_available=xla_is_available, priority=110, framework="jax")


@hookimpl
def kvport_register_attention_backends(register):
    """jax_ragged: pure jax.numpy, any XLA device. pallas_ragged: the Pallas TPU kernel (also
    runs on CPU in Pallas' TPU interpret mode, which is how the tests check it)."""
    register(name="jax_ragged", backend_class="kvport_tpu.attention.backends:JaxRaggedBackend",
             device_types=("tpu", "xla"), framework="jax")
    register(name="pallas_ragged",
             backend_class="kvport_tpu.attention.backends:PallasRaggedBackend",
             device_types=("tpu", "xla"), framework="jax")


@hookimpl
def kvport_register_models(register):
    """The JAX model families (framework "jax"), reading the same checkpoints as torch's."""
    for architecture, model_class in JAX_MODELS.items():
        register(architecture=architecture, model_class=model_class, framework="jax")
