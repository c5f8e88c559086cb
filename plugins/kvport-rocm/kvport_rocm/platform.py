"""The ROCm Platform: kvport-cuda's platform and worker on PyTorch's HIP build, which
answers the same torch.cuda calls (memory, graphs as HIP graphs, streams)."""
from __future__ import annotations

import torch

from kvport_cuda.platform import CudaPlatform

# gfx architectures with bf16 matrix instructions: CDNA2 (MI200), CDNA3 (MI300), CDNA4,
# RDNA3 and RDNA4.
BF16_ARCHITECTURES = ("gfx90a", "gfx94", "gfx95", "gfx11", "gfx12")


class RocmPlatform(CudaPlatform):
    """AMD GPUs. Never run on AMD hardware yet (README.md)."""
    name = "rocm"
    device_type = "rocm"
    attention_backend = "triton_paged_rocm"

    def __init__(self) -> None:
        if not torch.version.hip:
            raise RuntimeError(f"rocm: torch {torch.__version__} is not a ROCm (HIP) build")
        super().__init__()

    def architecture(self) -> str:
        """The gfx architecture, e.g. "gfx942" (an MI300X)."""
        props = torch.cuda.get_device_properties(self.device_index)
        return str(getattr(props, "gcnArchName", "")).split(":")[0]

    def has_native_bf16(self) -> bool:
        return self.architecture().startswith(BF16_ARCHITECTURES)

    def supports_tp_invariant(self) -> bool:
        """Not offered: the invariant kernel's bit-exactness was checked on NVIDIA GPUs only,
        and this plugin has never run on AMD hardware."""
        return False

    def distributed_backend(self) -> str:
        # torch.distributed's backend name: PyTorch's ROCm build serves "nccl" with RCCL.
        return "nccl"
