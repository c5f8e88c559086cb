"""kvport-neuron: the AWS Trainium / Inferentia platform plugin (device `neuron`, PyTorch
through TorchNeuron, torch_neuronx).

It has never run on Neuron hardware, and its NKI kernel has never been compiled: detection
and selection are tested with faked device files and a faked torch_neuronx, the attention's
torch formulation on the CPU through the conformance kit (README.md, docs/platforms.md).
"""
__version__ = "0.1.0"
