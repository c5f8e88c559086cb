"""Fixed-size KV blocks: reference counts, a hash-chained prefix cache, and an LRU free list.

A block is *in use* while some request holds it (ref_cnt > 0) and *free* otherwise. A free
block that still holds a cached full prefix stays findable by its hash until it is reused:
the free list is ordered least-recently-freed first, so the coldest cached blocks are the
first evicted.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

# A block's identity in the prefix cache: hash of (parent block hash, this block's tokens).
BlockHash = int


def hash_block(parent_hash: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Chain a block's tokens onto its parent's hash, so equal hashes mean equal prefixes
    (up to collisions, which `BlockPool.lookup` rules out by comparing the tokens too)."""
    return hash((parent_hash, tuple(token_ids)))


@dataclass(eq=False)
class KVBlock:
    """One physical block of the KV cache."""
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    parent_hash: BlockHash | None = None
    token_ids: tuple[int, ...] | None = None


class NoFreeBlocksError(RuntimeError):
    """Asked for more blocks than are free; callers check `num_free_blocks` first."""


class BlockPool:
    """Owns every block. Requests get blocks through the KV cache manager only."""

    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Free blocks, least recently freed first: the eviction order.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[BlockHash, KVBlock] = {}
        self.num_cache_queries = 0
        self.num_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free)."""
        return self.num_used_blocks / self.num_blocks

    def lookup(self, parent_hash: BlockHash | None, token_ids: Sequence[int]) -> KVBlock | None:
        """The cached block holding exactly these tokens after this parent, if any."""
        if not self.enable_caching:
            return None
        self.num_cache_queries += 1
        block = self._cached.get(hash_block(parent_hash, token_ids))
        if block is None or block.parent_hash != parent_hash or block.token_ids != tuple(token_ids):
            return None
        self.num_cache_hits += 1
        return block

    def allocate(self, count: int) -> list[KVBlock]:
        """Take `count` free blocks, evicting the least recently freed cached ones."""
        if count > len(self._free):
            raise NoFreeBlocksError(f"asked for {count} blocks, {len(self._free)} free")
        taken = []
        for _ in range(count):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            taken.append(block)
        return taken

    def touch(self, blocks: Sequence[KVBlock]) -> None:
        """Add a reference to blocks found in the cache or shared with another request."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Sequence[KVBlock]) -> None:
        """Drop one reference from each block; blocks reaching zero join the free list's end.

        Callers pass a request's blocks tail first, so a sequence's last blocks (least likely
        to be shared) are evicted before its first ones.
        """
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"block {block.block_id} freed more often than taken")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def cache(self, block: KVBlock, parent_hash: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
        """Make a full block findable by its prefix. Returns its hash."""
        block_hash = hash_block(parent_hash, token_ids)
        if not self.enable_caching or block.block_hash is not None:
            return block_hash
        if block_hash not in self._cached:
            block.block_hash, block.parent_hash = block_hash, parent_hash
            block.token_ids = tuple(token_ids)
            self._cached[block_hash] = block
        return block_hash

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; refused (False) while any block is in use."""
        if self.num_used_blocks:
            return False
        for block in list(self._cached.values()):
            self._evict(block)
        return True

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
            block.block_hash = block.parent_hash = block.token_ids = None
