"""The Neuron Platform: AWS Trainium / Inferentia through TorchNeuron, which registers the
`neuron` device with PyTorch (PrivateUse1) and answers torch.accelerator's memory queries.
Never run on Neuron hardware (README.md)."""
from __future__ import annotations

import importlib

import torch

from kvport.core.config import EngineConfig
from kvport.platforms.interface import Platform


class NeuronPlatform(Platform):
    name = "neuron"
    device_type = "neuron"
    attention_backend = "neuron_paged"

    def __init__(self) -> None:
        importlib.import_module("torch_neuronx")      # registers the `neuron` device
        if not torch.accelerator.is_available() or \
                torch.accelerator.current_accelerator().type != "neuron":
            current = torch.accelerator.current_accelerator()
            raise RuntimeError("neuron: torch_neuronx is imported but torch's accelerator is "
                               f"{current.type if current else 'none'}, not neuron")
        self.device_index = torch.accelerator.current_device_index()

    def total_memory_bytes(self) -> int:
        return int(torch.accelerator.get_memory_info(self.device_index)[1])

    def free_memory_bytes(self) -> int:
        return int(torch.accelerator.get_memory_info(self.device_index)[0])

    def supported_dtypes(self) -> tuple[str, ...]:
        return ("bfloat16", "float32", "float16")

    def default_dtype(self, checkpoint_dtype: str) -> str:
        # bf16 is what NeuronCores' matrix engines are built around; fp16 checkpoints keep
        # their dtype (bf16 would drop mantissa bits they were trained with).
        return "float16" if checkpoint_dtype == "float16" else "bfloat16"

    def distributed_backend(self) -> str:
        # TorchNeuron serves torch.distributed's collectives under the backend name "neuron".
        return "neuron"

    def default_attention_backend(self, config: EngineConfig) -> str:
        return self.attention_backend

    def worker_class(self) -> str:
        return "kvport_neuron.worker:NeuronWorker"
