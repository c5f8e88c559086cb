"""kvport-cuda: the NVIDIA GPU platform plugin (PyTorch, Triton kernels, CUDA graphs)."""
__version__ = "0.1.0"
