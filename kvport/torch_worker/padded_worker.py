"""A torch worker whose steps are padded to bucketed token counts (graph-compiling devices:
Gaudi, Neuron), shared by those plugins.

Padding a step's tokens needs somewhere for the padding tokens' keys and values to go: the
worker allocates one block more than the engine manages and points every padding slot at it.
The attention backend decides the buckets; it opts in by offering `enable_token_padding`.
"""
from __future__ import annotations

import torch

from kvport.torch_worker.worker import TorchWorker


class PaddedStepModel(torch.nn.Module):
    """The model run on the step's tokens padded to `attn_metadata.num_padded_tokens`;
    returns the real tokens' hidden states."""

    def __init__(self, model: torch.nn.Module, step: torch.nn.Module | None = None):
        super().__init__()
        self.model = model
        self.step = step if step is not None else model   # e.g. the model in device graphs

    def forward(self, input_ids, positions, kv_caches, attn_metadata):
        T = input_ids.shape[0]
        pad = attn_metadata.num_padded_tokens - T
        if pad > 0:
            input_ids = torch.nn.functional.pad(input_ids, (0, pad))
            positions = torch.nn.functional.pad(positions, (0, pad))
        return self.step(input_ids, positions, kv_caches, attn_metadata)[:T]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)


class PaddedStepWorker(TorchWorker):
    """TorchWorker with one spare KV block for padding tokens, when the backend pads."""

    def wrap_step(self, model: torch.nn.Module) -> torch.nn.Module:
        """What runs a padded step (the model itself; a platform may wrap it in graphs)."""
        return model

    def pads_tokens(self) -> bool:
        """True when the attention backend pads steps to buckets."""
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
        self.runner.model = PaddedStepModel(self.model, self.wrap_step(self.model))
