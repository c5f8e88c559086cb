"""kvport-rocm: the AMD GPU platform plugin (PyTorch for ROCm, Triton kernels, HIP graphs).

It has never run on AMD hardware: detection and selection are tested with a faked HIP build
of torch, the kernels with Triton's interpreter and on NVIDIA GPUs (see README.md).
"""
__version__ = "0.1.0"
