"""kvport-mps: the Apple Silicon platform plugin (device `mps`, PyTorch's Metal backend).

It has never run on a Mac: detection, dtype rules and memory sizing are tested with faked
answers, the attention formulation on the CPU through the conformance kit (README.md and
docs/platforms.md).
"""
__version__ = "0.1.0"
