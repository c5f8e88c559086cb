"""The Gaudi worker: the shared padded-step torch worker on the `hpu` device, with the model
in HPU graphs where they apply."""
from __future__ import annotations

import torch

from kvport.torch_worker.padded_worker import PaddedStepWorker
from kvport_gaudi.graphs import maybe_wrap


class GaudiWorker(PaddedStepWorker):
    """Runs the model on one Gaudi (the habana_frameworks bridge's current device)."""

    def torch_device(self) -> torch.device:
        return torch.device("hpu")

    def wrap_step(self, model: torch.nn.Module) -> torch.nn.Module:
        """HPU graphs, unless unavailable or --enforce-eager."""
        return maybe_wrap(model, self.config.device.enforce_eager)
