"""The replica router (kvport.distributed.router): pure Python, deterministic, no Ray."""
from __future__ import annotations

import random

import pytest

from kvport.distributed.router import NoReplicaError, Router, prefix_keys

BLOCK = 4


def block(tag: int) -> list[int]:
    """One full KV block of tokens, different for each tag."""
    return [tag * 10 + i for i in range(BLOCK)]


def test_prefix_keys_are_per_power_of_two_blocks_and_chained():
    assert prefix_keys([1, 2, 3], BLOCK, 64) == []                    # no full block
    prompt = block(1) + block(2) + block(3) + block(4) + block(5) + [9, 9]
    keys = prefix_keys(prompt, BLOCK, 64)
    assert len(keys) == 3                                              # 1, 2 and 4 blocks
    other = block(1) + block(2) + block(7) + block(4)
    assert prefix_keys(other, BLOCK, 64)[:2] == keys[:2]               # share 2 blocks
    assert prefix_keys(other, BLOCK, 64)[2] != keys[2]                 # not 4
    assert prefix_keys(prompt, BLOCK, 2) == keys[:2]                   # capped depth


def test_least_outstanding_with_ties_taken_in_turn():
    router = Router(3, BLOCK, affinity_slack=4)
    short = [1, 2]   # shorter than a block: no affinity, load alone decides
    assert [router.assign(short) for _ in range(4)] == [0, 1, 2, 0]
    assert router.outstanding == [2, 1, 1]
    router.release(0)
    router.release(0)
    assert router.assign(short) == 0          # now the only least loaded one
    router.release(2)
    assert router.assign(short) == 2
    assert router.outstanding == [1, 1, 1]


def test_a_repeated_prompt_returns_to_its_replica_within_the_slack():
    router = Router(2, BLOCK, affinity_slack=2)
    prompt = block(1) + block(2)
    # Never released: the first replica keeps it while at most 2 ahead, then the other
    # takes over and is remembered instead.
    choices = [router.assign(prompt) for _ in range(10)]
    assert choices == [0, 0, 0, 1, 1, 1, 1, 1, 1, 0]
    other = block(3) + block(4)
    assert router.assign(other) == 0          # unknown prefix: least loaded ([4, 6])


def test_the_longest_known_prefix_decides():
    router = Router(2, BLOCK, affinity_slack=0)
    shared, own_a, own_b = block(1), block(2), block(3)
    assert router.assign(shared + own_a) == 0
    # slack 0: replica 0 is one ahead, so the shared first block moves to replica 1
    assert router.assign(shared + own_b) == 1
    # loads are even again: own_a's two-block prefix (replica 0) beats the one-block
    # prefix that replica 1 served last
    assert router.assign(shared + own_a) == 0
    # ... and every prefix of that request now belongs to replica 0, the last to serve it
    router.release(0)                          # even loads: [1, 1]
    assert router.assign(shared + block(9)) == 0


def test_removed_replicas_get_nothing_and_none_left_raises():
    router = Router(2, BLOCK, affinity_slack=8)
    prompt = block(1) + block(2)
    assert router.assign(prompt) == 0
    router.remove(0)
    assert router.num_healthy == 1
    assert [router.assign(prompt) for _ in range(3)] == [1, 1, 1]   # affinity to 0 ignored
    router.release(0)                          # its requests still end (failed or moved)
    router.remove(1)
    with pytest.raises(NoReplicaError, match="no replica"):
        router.assign(prompt)


def test_release_without_assign_is_an_error():
    router = Router(2, BLOCK, affinity_slack=1)
    with pytest.raises(ValueError, match="no outstanding"):
        router.release(1)
    with pytest.raises(ValueError, match="num_replicas"):
        Router(0, BLOCK, affinity_slack=1)


@pytest.mark.parametrize("slack", [0, 1, 3])
def test_affinity_never_exceeds_the_slack_under_random_traffic(slack):
    """Whatever the prompts and the order of endings, a request only goes to a replica more
    loaded than the least loaded one by at most `slack`."""
    rng = random.Random(1234 + slack)   # fixed seed: a failure reproduces
    router = Router(3, BLOCK, affinity_slack=slack)
    system = block(5) + block(6)         # a prefix most prompts share, as a system prompt is
    live: list[int] = []
    for _ in range(2000):
        if live and rng.random() < 0.45:
            router.release(live.pop(rng.randrange(len(live))))
            continue
        prompt = (system if rng.random() < 0.8 else []) + block(rng.randrange(6)) * 2
        before = list(router.outstanding)
        chosen = router.assign(prompt)
        assert before[chosen] <= min(before) + slack, (before, chosen)
        live.append(chosen)
    assert sum(router.outstanding) == len(live)
