"""The Neuron worker: the shared torch worker on the `neuron` device, every step padded to
the static shape buckets (Neuron compiles one graph per shape).

Padding a step's tokens needs somewhere for the padding tokens' keys and values to go: the
worker allocates one block more than the engine manages and points every padding slot at it.
"""
from __future__ import annotations

import torch

from kvport.torch_worker.worker import TorchWorker


class PaddedStepModel(torch.nn.Module):
    """The model run on the step's tokens padded to `attn_metadata.num_padded_tokens`;
    returns the real tokens' hidden states."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, positions, kv_caches, attn_metadata):
        T = input_ids.shape[0]
        pad = attn_metadata.num_padded_tokens - T
        if pad > 0:
            input_ids = torch.nn.functional.pad(input_ids, (0, pad))
            positions = torch.nn.functional.pad(positions, (0, pad))
        return self.model(input_ids, positions, kv_caches, attn_metadata)[:T]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)


class NeuronWorker(TorchWorker):
    """Runs the model on one Neuron device (torch's current accelerator index)."""

    def torch_device(self) -> torch.device:
        return torch.device("neuron", self.platform.device_index)

    def pads_tokens(self) -> bool:
        """True when the attention backend pads steps to buckets (neuron_paged does)."""
        return callable(getattr(self.attn_backend, "enable_token_padding", None))

    def determine_available_kv_blocks(self) -> int:
        blocks = super().determine_available_kv_blocks()
        return max(blocks - 1, 0) if self.pads_tokens() else blocks

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """The shared worker's cache and runner, with one block more (the padding tokens')
        and the runner's model replaced by the padded step."""
        if not self.pads_tokens():
            super().initialize_kv_cache(num_blocks)
            return
        super().initialize_kv_cache(num_blocks + 1)
        self.attn_backend.enable_token_padding(pad_slot=num_blocks * self.config.cache.block_size)
        self.runner.model = PaddedStepModel(self.model)
