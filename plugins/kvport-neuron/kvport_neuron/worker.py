"""The Neuron worker: the shared padded-step torch worker on the `neuron` device, every step
padded to the static shape buckets (Neuron compiles one graph per shape)."""
from __future__ import annotations

import torch

from kvport.torch_worker.padded_worker import PaddedStepWorker


class NeuronWorker(PaddedStepWorker):
    """Runs the model on one Neuron device (torch's current accelerator index)."""

    def torch_device(self) -> torch.device:
        return torch.device("neuron", self.platform.device_index)
