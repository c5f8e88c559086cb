"""Block tables kept on the GPU across steps, one row per live request.

The shared runner rebuilds a [requests, max_blocks] table from Python lists every step; at
256 requests that is most of a millisecond of host time plus a large copy. Here each request
owns a row of a device-resident table from its arrival until it is freed, and a step only
sends the block ids that are new since the last step (a request gains one block per
`block_size` tokens). A step's table is then one `index_select` of its requests' rows.
"""
from __future__ import annotations

import numpy as np
import torch

from kvport_cuda.staging import HostStaging


class DeviceBlockTables:
    """[max_rows, max_blocks] int32 block ids on `device`, rows handed out per request."""

    def __init__(self, max_rows: int, max_blocks: int, device: torch.device):
        self.max_blocks = max_blocks
        self.table = torch.zeros(max_rows, max_blocks, dtype=torch.int32, device=device)
        self.rows: dict[str, int] = {}
        self.filled: dict[str, int] = {}           # block ids already on the device
        self._free_rows = list(range(max_rows - 1, -1, -1))
        self._pending: list[tuple[int, int, list[int]]] = []   # (row, first column, ids)
        self._staging = HostStaging(device, torch.int32)
        self._rows_staging = HostStaging(device, torch.int32)

    def add(self, req_id: str, block_ids: list[int]) -> None:
        """A request the table does not hold yet, with its blocks so far."""
        if req_id in self.rows:
            raise KeyError(f"request {req_id!r} already has a block-table row")
        if not self._free_rows:
            raise RuntimeError(f"more than {self.table.shape[0]} live requests: the block "
                               "table has no free row (max_num_seqs too small for the table)")
        self.rows[req_id] = self._free_rows.pop()
        self.filled[req_id] = 0
        self.extend(req_id, block_ids)

    def extend(self, req_id: str, block_ids: list[int]) -> None:
        """Send the ids of `block_ids` (the request's whole list) not sent yet."""
        start = self.filled[req_id]
        if len(block_ids) > start:
            if len(block_ids) > self.max_blocks:
                raise ValueError(f"request {req_id!r} has {len(block_ids)} blocks, more than "
                                 f"the {self.max_blocks} of max_model_len")
            self._pending.append((self.rows[req_id], start, block_ids[start:]))
            self.filled[req_id] = len(block_ids)

    def remove(self, req_id: str) -> None:
        row = self.rows.pop(req_id, None)
        if row is not None:
            del self.filled[req_id]
            self._free_rows.append(row)

    def flush(self) -> None:
        """Write the pending block ids into the device table (one copy, one scatter)."""
        if not self._pending:
            return
        n = sum(len(ids) for _, _, ids in self._pending)
        rows = np.empty(n, dtype=np.int32)
        cols = np.empty(n, dtype=np.int32)
        vals = np.empty(n, dtype=np.int32)
        at = 0
        for row, first, ids in self._pending:
            k = len(ids)
            rows[at:at + k] = row
            cols[at:at + k] = np.arange(first, first + k)
            vals[at:at + k] = ids
            at += k
        self._pending.clear()
        packed = self._staging.to_device(np.concatenate([rows, cols, vals])).view(3, n).long()
        self.table[packed[0], packed[1]] = packed[2].int()

    def gather(self, req_ids: list[str], out: torch.Tensor | None = None,
               rows_device: torch.Tensor | None = None) -> torch.Tensor:
        """[len(req_ids), max_blocks] table of these requests, in this order. `rows_device`
        holds their row indices already on the device (else they are sent now)."""
        if rows_device is None:
            rows = np.fromiter((self.rows[r] for r in req_ids), dtype=np.int32,
                               count=len(req_ids))
            rows_device = self._rows_staging.to_device(rows)
        if out is None:
            return self.table.index_select(0, rows_device)
        return torch.index_select(self.table, 0, rows_device, out=out)
