"""Which replica serves a request: least outstanding requests, with prefix affinity.

Each replica keeps its own prefix cache, so a prompt served where its prefix was served before
skips that prefix's prefill. The router remembers, for prompt prefixes of 1, 2, 4, ... full KV
blocks, the replica that last served them. A new request goes to the replica remembered for
its longest known prefix, unless that replica has more than `affinity_slack` outstanding
requests above the least loaded one; then (and when no prefix is known) it goes to the least
loaded replica, ties taken in turn. The slack bounds the imbalance affinity may cause: a
system prompt every request shares attracts traffic to one replica only until it is `slack`
requests ahead, after which the next replica takes over (and is remembered instead).

Pure Python and deterministic: the same calls give the same choices.
"""
from __future__ import annotations

from collections import OrderedDict


class NoReplicaError(RuntimeError):
    """Every replica has been removed; nothing can serve the request."""


def prefix_keys(prompt_token_ids: list[int], block_size: int,
                max_blocks: int) -> list[int]:
    """Hashes of the prompt's first 1, 2, 4, ... full blocks (up to `max_blocks`), shortest first.

    Chained per block, so two prompts share a key exactly when they share that many blocks.
    """
    keys: list[int] = []
    chained = 0
    num_blocks = min(len(prompt_token_ids) // block_size, max_blocks)
    for block in range(num_blocks):
        start = block * block_size
        chained = hash((chained, tuple(prompt_token_ids[start:start + block_size])))
        depth = block + 1
        if depth & (depth - 1) == 0:   # a power of two
            keys.append(chained)
    return keys


class Router:
    """Assigns requests to healthy replicas and counts what each has outstanding."""

    # Prefix memory: longer prompts than 64 blocks share their affinity with their first 64
    # blocks, and the least recently used prefixes are forgotten past the limit.
    MAX_AFFINITY_BLOCKS = 64
    MAX_REMEMBERED_PREFIXES = 65536

    def __init__(self, num_replicas: int, block_size: int, affinity_slack: int):
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        self.block_size = block_size
        self.affinity_slack = affinity_slack
        self.outstanding = [0] * num_replicas
        self.assigned = [0] * num_replicas      # requests ever assigned, for /metrics
        self.healthy = [True] * num_replicas
        self._owners: OrderedDict[int, int] = OrderedDict()   # prefix key -> replica
        self._next_turn = 0

    @property
    def num_healthy(self) -> int:
        return sum(self.healthy)

    def assign(self, prompt_token_ids: list[int]) -> int:
        """Choose a healthy replica for this prompt and count the request on it.

        Every `assign` must be matched by one `release` of the returned replica. Raises
        NoReplicaError when no replica is healthy.
        """
        candidates = [i for i, ok in enumerate(self.healthy) if ok]
        if not candidates:
            raise NoReplicaError("no replica is left to serve requests")
        least = min(self.outstanding[i] for i in candidates)
        keys = prefix_keys(prompt_token_ids, self.block_size, self.MAX_AFFINITY_BLOCKS)
        owner = self._remembered_owner(keys)
        if owner is not None and self.outstanding[owner] <= least + self.affinity_slack:
            chosen = owner
        else:
            chosen = self._take_turn([i for i in candidates if self.outstanding[i] == least])
        self._remember(keys, chosen)
        self.outstanding[chosen] += 1
        self.assigned[chosen] += 1
        return chosen

    def release(self, replica: int) -> None:
        """A request assigned to `replica` has ended (finished, failed or moved)."""
        if self.outstanding[replica] <= 0:
            raise ValueError(f"replica {replica} has no outstanding request to release")
        self.outstanding[replica] -= 1

    def remove(self, replica: int) -> None:
        """Stop assigning to `replica` (it failed); its outstanding requests still release."""
        self.healthy[replica] = False

    def _remembered_owner(self, keys: list[int]) -> int | None:
        for key in reversed(keys):   # the longest shared prefix says the most
            owner = self._owners.get(key)
            if owner is not None and self.healthy[owner]:
                return owner
        return None

    def _remember(self, keys: list[int], replica: int) -> None:
        for key in keys:
            self._owners[key] = replica
            self._owners.move_to_end(key)
        while len(self._owners) > self.MAX_REMEMBERED_PREFIXES:
            self._owners.popitem(last=False)

    def _take_turn(self, tied: list[int]) -> int:
        """The first tied replica at or after the turn pointer, so ties rotate."""
        chosen = next((i for i in tied if i >= self._next_turn), tied[0])
        self._next_turn = chosen + 1
        return chosen
