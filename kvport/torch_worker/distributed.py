"""torch.distributed set-up for one tensor-parallel worker process.

The executor (kvport/core/executor.py) starts one process per rank and hands each worker its
`TensorParallelRank`: rank, group size, meeting point and the Platform's backend (gloo on
CPU, nccl on CUDA). The device is already bound when this runs, so NCCL opens its
communicator on the right GPU.
"""
from __future__ import annotations

import datetime
import logging

import torch

from kvport.core.tensor_parallel import TensorParallelRank
from kvport.models.tp_group import SINGLE_GROUP, TensorParallelGroup

logger = logging.getLogger(__name__)

# How long a collective may wait for a peer. A dead peer is noticed by the executor (which
# then ends every rank) much sooner; this only bounds a rank that is left alone.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


def init_tensor_parallel(parallel: TensorParallelRank,
                         device: torch.device) -> TensorParallelGroup:
    """Join the group (blocks until every rank has joined) and return its handle.

    One rank: nothing to join, and torch.distributed is left alone.
    """
    if parallel.world_size == 1:
        return SINGLE_GROUP
    import torch.distributed as dist

    dist.init_process_group(backend=parallel.backend, init_method=parallel.init_method,
                            rank=parallel.rank, world_size=parallel.world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    group = TensorParallelGroup(parallel.rank, parallel.world_size)
    # The first collective builds the backend's communicator (NCCL's is expensive and cannot
    # be built inside a CUDA-graph capture): do it now, on this rank's device.
    group.all_reduce(torch.zeros(1, device=device))
    logger.info("tensor-parallel rank %d of %d joined (%s on %s)", parallel.rank,
                parallel.world_size, parallel.backend, device)
    return group


def destroy_tensor_parallel(group: TensorParallelGroup) -> None:
    """Leave the group (a no-op for one rank)."""
    if group.world_size == 1:
        return
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
