"""The Platform interface: everything the core may ask about a kind of hardware.

One Platform per plugin. The core never asks "is this CUDA?"; it asks a Platform a capability
question. Importing a Platform module may import its framework (torch, jax): that only
happens after selection. Availability is checked earlier, through the cheap callable given
at registration (see hookspecs.PlatformRegistration), which must never raise.
"""
from __future__ import annotations

import abc
from typing import ClassVar

from kvport.core.config import EngineConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class Platform(abc.ABC):
    """A kind of device kvport can run on. Instantiated once, after selection."""

    name: ClassVar[str] = ""                 # plugin-facing name, e.g. "cpu"
    device_type: ClassVar[str] = ""          # what `--device` takes, e.g. "cpu", "cuda", "hpu"

    @abc.abstractmethod
    def total_memory_bytes(self) -> int:
        """Total memory of the device the engine runs on, in bytes."""

    @abc.abstractmethod
    def free_memory_bytes(self) -> int:
        """Memory the engine may still take on that device now, in bytes."""

    @abc.abstractmethod
    def supported_dtypes(self) -> tuple[str, ...]:
        """Model dtypes this device computes in, best first ("bfloat16", "float32", ...)."""

    @abc.abstractmethod
    def default_dtype(self, checkpoint_dtype: str) -> str:
        """The dtype `dtype="auto"` resolves to for a checkpoint stored in `checkpoint_dtype`."""

    @abc.abstractmethod
    def distributed_backend(self) -> str:
        """torch.distributed / collective backend name: "nccl", "gloo", "hccl", "xla", ..."""

    @abc.abstractmethod
    def default_attention_backend(self, config: EngineConfig) -> str:
        """Registered name of the attention backend to use when the user names none."""

    @abc.abstractmethod
    def worker_class(self) -> str:
        """Dotted path ("package.module:Class") of this platform's Worker subclass."""

    def bind_tensor_parallel_rank(self, rank: int, world_size: int) -> None:
        """Make this process use the device of tensor-parallel rank `rank` of `world_size`.

        Called once in each tensor-parallel worker process (one process per rank, all on
        this host), before the worker touches a device; memory queries afterwards answer for
        that device. Raise ConfigError when the host has fewer than `world_size` devices.
        The default does nothing: every rank shares the one device (a CPU host).
        """

    def supported_quantizations(self) -> tuple[str, ...]:
        """Quantization schemes (names from `kvport.core.config.QUANTIZATIONS`) this device's
        worker implements; none by default."""
        return ()

    def supports_tp_invariant(self) -> bool:
        """Whether this device's worker has shape-invariant matmul kernels for
        `ParallelConfig.tp_invariant` (its `TorchWorker.invariant_matmul` returns them):
        each output element's bits must depend only on its own input row and weight row,
        never on the matrix shapes (kvport/models/invariant.py); False by default."""
        return False

    def check_and_update_config(self, config: EngineConfig) -> None:
        """The one place a platform adjusts configuration (dtype, block size, graphs, ...).

        The default resolves `dtype="auto"` with `default_dtype` later, once the checkpoint is
        known, and rejects dtypes, quantizations and tp_invariant where the device lacks them.
        Override to add device rules; call super().
        """
        from kvport.core.config import ConfigError
        dtype = config.model.dtype
        if dtype != "auto" and dtype not in self.supported_dtypes():
            raise ConfigError(f"dtype {dtype} is not supported on {self.device_type}; "
                              f"supported: {', '.join(self.supported_dtypes())}")
        quantization = config.model.quantization
        if quantization is not None and quantization not in self.supported_quantizations():
            offered = ", ".join(self.supported_quantizations()) or "none"
            raise ConfigError(f"quantization {quantization} is not supported on "
                              f"{self.device_type}; supported: {offered}")
        if config.parallel.tp_invariant and not self.supports_tp_invariant():
            raise ConfigError(f"tp_invariant is not supported on {self.device_type}: its "
                              "platform plugin has no shape-invariant matmul kernels")

    def resolve_dtype(self, config: EngineConfig, checkpoint_dtype: str) -> str:
        """The concrete dtype the model runs in."""
        if config.model.dtype == "auto":
            return self.default_dtype(checkpoint_dtype)
        return config.model.dtype
