"""The Triton paged-attention kernels with launch settings for AMD GPUs.

Untuned: chosen from AMD's guidance for Triton on CDNA (a wavefront is 64 lanes, so 4 warps
are 256 threads; software pipelining gains little and costs registers, hence one stage),
never timed on AMD hardware.
"""
from __future__ import annotations

from kvport.attention_backends.triton_paged import (TritonLaunchConfig,
                                                    TritonPagedAttentionBackend)

ROCM_LAUNCH = TritonLaunchConfig(prefill_block_m=64, prefill_block_n=32, prefill_warps=4,
                                 prefill_stages=1, decode_block_n=32, decode_warps=4,
                                 decode_stages=1, decode_programs_per_sm=2)


class RocmTritonPagedBackend(TritonPagedAttentionBackend):
    name = "triton_paged_rocm"
    launch = ROCM_LAUNCH
