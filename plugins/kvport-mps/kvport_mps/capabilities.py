"""What PyTorch's MPS backend can compute, as rules of the macOS version (pure functions;
the platform feeds them this Mac's answers, tests feed them others).

* float64 does not exist on MPS (Metal has no double type): never offered.
* bfloat16 needs macOS 14 (Sonoma) or later; on macOS 13 torch refuses it.
* float16 and float32 work from macOS 12.3 on. Apple GPUs compute float16 at twice the rate
  of float32, so float16 is the default for float32 and float16 checkpoints; bfloat16
  checkpoints stay bfloat16 where it exists (float16's narrower range can overflow on them).
"""
from __future__ import annotations

BF16_MIN_MACOS = (14, 0)


def supported_dtypes(macos: tuple[int, ...]) -> tuple[str, ...]:
    """The model dtypes MPS computes in on this macOS version, best first."""
    if macos >= BF16_MIN_MACOS:
        return ("float16", "bfloat16", "float32")
    return ("float16", "float32")


def default_dtype(checkpoint_dtype: str, macos: tuple[int, ...]) -> str:
    """What dtype="auto" becomes for a checkpoint stored in `checkpoint_dtype`."""
    if checkpoint_dtype == "bfloat16" and "bfloat16" in supported_dtypes(macos):
        return "bfloat16"
    return "float16"


def why_unsupported(dtype: str, macos: tuple[int, ...]) -> str | None:
    """The reason MPS cannot run `dtype` on this macOS, or None when it can."""
    if dtype == "bfloat16" and macos < BF16_MIN_MACOS:
        version = ".".join(map(str, macos)) or "?"
        return f"bfloat16 on MPS needs macOS 14 or later (this Mac runs macOS {version})"
    if dtype not in supported_dtypes(macos):
        return f"{dtype} is not supported by MPS"
    return None
