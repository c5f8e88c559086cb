"""kvport-gaudi: the Intel Gaudi platform plugin (device `hpu`, PyTorch through
habana_frameworks).

It has never run on Gaudi hardware: detection and selection are tested with faked device
files and a faked habana_frameworks, the attention formulation on the CPU through the
conformance kit (see README.md and docs/platforms.md).
"""
__version__ = "0.1.0"
