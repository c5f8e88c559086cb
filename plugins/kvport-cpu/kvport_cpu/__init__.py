"""kvport-cpu: the CPU platform plugin (PyTorch on x86-64 and Arm CPUs)."""
__version__ = "0.1.0"
