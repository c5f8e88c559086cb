"""Entry point of kvport-neuron: registers the `neuron` platform and its attention backend.

Cheap to import: detection reads files only (kvport_neuron.detect); torch, torch_neuronx and
neuronxcc load when the platform is selected.
"""
from __future__ import annotations

from kvport.platforms.hookspecs import hookimpl
from kvport_neuron.detect import neuron_is_available

# The kvport plugin API versions this plugin supports (see docs/plugins.md, version policy).
KVPORT_PLUGIN_API = ">=1.0,<2"


@hookimpl
def kvport_register_platforms(register):
    """`neuron`: AWS Trainium / Inferentia through TorchNeuron, after cuda, rocm, tpu, hpu."""
    register(name="neuron", device_type="neuron",
             platform_class="kvport_neuron.platform:NeuronPlatform",
             is_available=neuron_is_available, priority=50, framework="torch")


@hookimpl
def kvport_register_attention_backends(register):
    """neuron_paged: bucketed prior/active paged attention (NKI decode kernel when
    neuronxcc is importable), the neuron default."""
    register(name="neuron_paged", backend_class="kvport_neuron.attention:NeuronPagedBackend",
             device_types=("neuron",), framework="torch")
