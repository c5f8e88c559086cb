"""Block pool and KV cache manager: reference counts, prefix hits and misses, LRU order."""
import random

import pytest

from kvport.core.block_pool import BlockPool, NoFreeBlocksError, hash_block
from kvport.core.kv_cache_manager import KVCacheManager
from kvport.core.request import Request, RequestStatus
from kvport.core.sampling_params import SamplingParams


def make_request(rid, tokens, **params):
    return Request(rid, list(tokens), SamplingParams(**params))


def test_allocate_and_free_counts_references():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    assert (a.ref_cnt, b.ref_cnt, pool.num_free_blocks) == (1, 1, 2)
    pool.touch([a])
    assert a.ref_cnt == 2
    pool.free([a, b])
    assert (a.ref_cnt, b.ref_cnt, pool.num_free_blocks) == (1, 0, 3)
    pool.free([a])
    assert pool.num_free_blocks == 4
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([a])
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(5)


def test_lookup_compares_tokens_and_parent():
    pool = BlockPool(4)
    block = pool.allocate(1)[0]
    parent = hash_block(None, [9, 9])
    pool.cache(block, parent, [1, 2])
    assert pool.lookup(parent, [1, 2]) is block
    assert pool.lookup(parent, [1, 3]) is None
    assert pool.lookup(None, [1, 2]) is None
    # A forged hash collision (same hash slot, other tokens) is not a hit.
    pool._cached[hash_block(parent, [7, 7])] = block
    assert pool.lookup(parent, [7, 7]) is None


def test_lru_evicts_least_recently_freed_cached_block_first():
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    for i, block in enumerate(blocks):
        pool.cache(block, None, [i])
    pool.free([blocks[1]])
    pool.free([blocks[0]])
    pool.free([blocks[2]])
    # All three still findable while free.
    assert all(pool.lookup(None, [i]) is blocks[i] for i in range(3))
    taken = pool.allocate(1)[0]
    assert taken is blocks[1]
    assert pool.lookup(None, [1]) is None
    assert pool.lookup(None, [0]) is blocks[0]


def test_touching_a_free_cached_block_takes_it_off_the_free_list():
    pool = BlockPool(2)
    block = pool.allocate(1)[0]
    pool.cache(block, None, [5])
    pool.free([block])
    assert pool.num_free_blocks == 2
    pool.touch([pool.lookup(None, [5])])
    assert pool.num_free_blocks == 1 and block.ref_cnt == 1
    assert pool.allocate(1)[0] is not block


def test_prefix_hit_shares_blocks_and_leaves_a_token_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    first = make_request("a", range(10))
    assert kv.allocate_slots(first, 10) is not None
    second = make_request("b", list(range(8)) + [50, 51, 52])
    hits = kv.find_computed_blocks(second)
    assert [b.block_id for b in hits] == kv.block_ids("a")[:2]
    exact = make_request("c", range(8))          # block-aligned: last block must be recomputed
    assert len(kv.find_computed_blocks(exact)) == 1
    miss = make_request("d", [99] + list(range(1, 10)))
    assert kv.find_computed_blocks(miss) == []


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_caching=False)
    kv.allocate_slots(make_request("a", range(12)), 12)
    assert kv.find_computed_blocks(make_request("b", range(12))) == []
    assert kv.pool.num_cached_blocks == 0


def test_allocate_slots_fails_without_changing_anything():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    big = make_request("a", range(20))
    assert kv.allocate_slots(big, 20) is None
    assert kv.pool.num_free_blocks == 3 and kv.block_ids("a") == []


def test_samples_share_leader_prompt_blocks():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_caching=False)
    leader = make_request("x#0", range(10))
    kv.allocate_slots(leader, 10)
    leader.num_computed_tokens, leader.status = 10, RequestStatus.RUNNING
    child = Request("x#1", list(range(10)), leader.sampling_params, 1, prompt_leader=leader)
    shared = kv.find_computed_blocks(child)
    assert [b.block_id for b in shared] == kv.block_ids("x#0")[:2]
    kv.allocate_slots(child, 2, shared)
    assert all(b.ref_cnt == 2 for b in shared)
    kv.free(leader)
    kv.free(child)
    assert kv.pool.num_free_blocks == 16


def test_random_allocate_free_keeps_pool_consistent():
    rng = random.Random(0)
    kv = KVCacheManager(num_blocks=64, block_size=4)
    live = {}
    for step in range(500):
        if live and rng.random() < 0.4:
            kv.free(live.pop(rng.choice(sorted(live))))
        else:
            prefix = rng.choice([[1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9, 9]])
            request = make_request(f"r{step}", prefix + [rng.randrange(100) for _ in range(rng.randrange(1, 12))])
            hits = kv.find_computed_blocks(request)
            need = request.num_tokens - 4 * len(hits)
            if kv.allocate_slots(request, need, hits) is not None:
                live[request.request_id] = request
        held = sum(b.ref_cnt for b in kv.pool.blocks)
        assert held == sum(kv.num_blocks_of(r) for r in live)
    for request in live.values():
        kv.free(request)
    assert kv.pool.num_free_blocks == 64
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)
