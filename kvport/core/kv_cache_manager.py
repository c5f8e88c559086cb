"""Per-request block tables on top of the block pool.

A request holds exactly ceil(tokens_with_kv / block_size) blocks: blocks are taken for the
tokens scheduled in a step, never ahead, which is what keeps KV waste under one partial block
per request. Full blocks are registered in the prefix cache as soon as their tokens are
scheduled, so a later request (or a later sample of the same request) can reuse them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kvport.core.block_pool import BlockHash, BlockPool, KVBlock
from kvport.core.request import Request, RequestStatus


@dataclass
class _RequestBlocks:
    blocks: list[KVBlock] = field(default_factory=list)
    hashes: list[BlockHash] = field(default_factory=list)  # of its leading full blocks


class KVCacheManager:
    """Allocates, shares, caches and frees the blocks of every request."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self._tables: dict[str, _RequestBlocks] = {}

    @property
    def enable_caching(self) -> bool:
        return self.pool.enable_caching

    def block_ids(self, request_id: str) -> list[int]:
        table = self._tables.get(request_id)
        return [b.block_id for b in table.blocks] if table else []

    def num_blocks_of(self, request_id: str) -> int:
        table = self._tables.get(request_id)
        return len(table.blocks) if table else 0

    def find_computed_blocks(self, request: Request) -> list[KVBlock]:
        """Blocks whose KV this new request can reuse instead of computing.

        Samples of one request share their leader's full prompt blocks (prefix caching on or
        off); otherwise the prefix cache is searched block by block. At least one token is
        always left to compute, since the last position's logits are needed.
        """
        max_blocks = (request.num_tokens - 1) // self.block_size
        leader = request.prompt_leader
        if (leader is not None and leader.status == RequestStatus.RUNNING
                and leader.prompt_computed and leader.request_id in self._tables):
            shareable = min(max_blocks, request.num_prompt_tokens // self.block_size)
            return self._tables[leader.request_id].blocks[:shareable]
        hits: list[KVBlock] = []
        parent: BlockHash | None = None
        tokens = request.all_token_ids
        for index in range(max_blocks):
            chunk = tokens[index * self.block_size:(index + 1) * self.block_size]
            block = self.pool.lookup(parent, chunk)
            if block is None:
                break
            hits.append(block)
            parent = block.block_hash
        return hits

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[KVBlock] | None = None) -> list[int] | None:
        """Give `request` blocks for `num_new_tokens` more tokens after its computed ones.

        `computed_blocks` (first scheduling only) are reused blocks whose tokens count as
        computed. Returns the newly allocated block ids, or None (changing nothing) when the
        pool cannot supply them.
        """
        computed_blocks = computed_blocks or []
        table = self._tables.get(request.request_id) or _RequestBlocks()
        held = len(table.blocks) + len(computed_blocks)
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        needed = -(-(num_computed + num_new_tokens) // self.block_size) - held
        reclaimable = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if needed > self.pool.num_free_blocks - reclaimable:
            return None
        self.pool.touch(computed_blocks)
        table.blocks.extend(computed_blocks)
        new_blocks = self.pool.allocate(max(needed, 0))
        table.blocks.extend(new_blocks)
        self._tables[request.request_id] = table
        self._cache_full_blocks(request, table, num_computed + num_new_tokens)
        return [b.block_id for b in new_blocks]

    def free(self, request: Request) -> None:
        """Give back every block of the request (tail first, for the LRU order)."""
        table = self._tables.pop(request.request_id, None)
        if table is not None:
            self.pool.free(list(reversed(table.blocks)))

    def kv_waste_slots(self, requests: list[Request]) -> int:
        """Slots allocated to these requests that hold no token (only their last blocks)."""
        waste = 0
        for request in requests:
            held = self.num_blocks_of(request.request_id) * self.block_size
            waste += max(held - request.num_computed_tokens, 0)
        return waste

    def _cache_full_blocks(self, request: Request, table: _RequestBlocks, num_tokens: int) -> None:
        """Register the blocks that `num_tokens` scheduled tokens fill completely. A block
        completed by a pending token (async scheduling) waits until that token is known."""
        num_full = min(min(num_tokens, request.num_tokens) // self.block_size,
                       len(table.blocks))
        if not self.enable_caching or len(table.hashes) >= num_full:
            return
        tokens = request.all_token_ids
        parent = table.hashes[-1] if table.hashes else None
        for index in range(len(table.hashes), num_full):
            chunk = tokens[index * self.block_size:(index + 1) * self.block_size]
            parent = self.pool.cache(table.blocks[index], parent, chunk)
            table.hashes.append(parent)
