"""Is there a Neuron device and TorchNeuron? Answered without importing either.

* Neuron devices are the aws-neuronx driver's device files /dev/neuron<N> (one per chip:
  a Trainium2 chip has 8 NeuronCores);
* torch_neuronx (TorchNeuron, which registers the `neuron` device with PyTorch) is looked up
  with find_spec, never imported;
* NEURON_RT_VISIBLE_CORES set to nothing hides every NeuronCore.
"""
from __future__ import annotations

import importlib.util
import os
import re

DEVICE_FOLDER = "/dev"
DEVICE_PATTERN = re.compile(r"neuron\d+$")
VISIBILITY_VARIABLE = "NEURON_RT_VISIBLE_CORES"
TORCH_NEURONX_HINT = "install TorchNeuron: `pip install torch-neuronx` from AWS's Neuron repository"


def neuron_device_files(folder: str = DEVICE_FOLDER) -> list[str]:
    """Paths of /dev/neuron<N> (empty when there is none)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted(os.path.join(folder, n) for n in names if DEVICE_PATTERN.match(n))


def neuron_is_available(folder: str = DEVICE_FOLDER) -> tuple[bool, str]:
    """(available, reason) for the `neuron` platform. Never raises."""
    try:
        devices = neuron_device_files(folder)
        importable = importlib.util.find_spec("torch_neuronx") is not None
        if not devices and not importable:
            return False, "no /dev/neuron* and torch_neuronx not importable"
        if not importable:
            return False, (f"{len(devices)} Neuron device(s), but torch_neuronx is not "
                           f"importable: {TORCH_NEURONX_HINT}")
        if not devices:
            return False, ("torch_neuronx is installed but there is no /dev/neuron* (not a "
                           "Trainium/Inferentia instance, or the aws-neuronx driver is not "
                           "loaded)")
        cores = os.environ.get(VISIBILITY_VARIABLE)
        if cores is not None and not cores.strip():
            return False, f"{VISIBILITY_VARIABLE}='' hides every NeuronCore"
        visible = f" ({VISIBILITY_VARIABLE}={cores})" if cores else ""
        return True, f"{len(devices)} Neuron device(s){visible}"
    except Exception as exc:     # the contract: report, never raise
        return False, f"Neuron detection failed: {type(exc).__name__}: {exc}"
