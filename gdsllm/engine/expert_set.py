"""The expert cache's contents and its eviction rule, kept in the expert books
(gdsllm.engine.expert_books) that `LLM`'s cache and the service's scheduler share.

    cached = ExpertSet(num_layers)
    cached.add((layer, expert), slot)       # most recently used within its layer
    cached.touch((layer, expert))           # used again
    key = cached.victim(pos, skip)          # what to evict while layer `pos` runs
    slot = cached.remove(key)

Eviction: from the layer whose next turn is farthest, least recently used within it. Layers run
in a cycle, so while layer `pos` runs, its own experts not in use are needed again only a whole
pass later, then those of `pos - 1`, and so on; `pos + 1`'s are needed next.

Measured by replaying routing traces (benchmarks/expert_policy.py, docs/BENCHMARKS.md): on a
48-layer, 128-expert, top-8 trace with 19% of the experts cached (the 4 GiB H200 run's share)
this rule hit 19.0% of routed experts at batch 1 against plain LRU's 17.4% (LRU keeps the layers
that just ran, exactly the ones needed last), and at batch 8, where a pass routes more experts
than the cache holds, LRU hit nothing. On the H200 at batch 8: 19.0% against LRU's 0.0%.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterator

Key = tuple[int, int]  # (layer, expert)


class ExpertSet:
    """Cached experts -> slot, with each layer's experts in least-recently-used order."""

    def __init__(self, num_layers: int):
        self.slots: dict[Key, int] = {}
        self.layers: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_layers)]

    def __contains__(self, key: Key) -> bool:
        return key in self.slots

    def __getitem__(self, key: Key) -> int:
        return self.slots[key]

    def __iter__(self) -> Iterator[Key]:
        return iter(self.slots)

    def __len__(self) -> int:
        return len(self.slots)

    def get(self, key: Key, default=None):
        return self.slots.get(key, default)

    def of_layer(self, layer: int) -> list[int]:
        """The layer's cached experts, least recently used first."""
        return list(self.layers[layer])

    def add(self, key: Key, slot: int) -> None:
        self.slots[key] = slot
        self.layers[key[0]][key[1]] = None
        self.layers[key[0]].move_to_end(key[1])

    def touch(self, key: Key) -> None:
        self.layers[key[0]].move_to_end(key[1])

    def remove(self, key: Key) -> int | None:
        """Forget `key`; its slot (None if it was not cached)."""
        slot = self.slots.pop(key, None)
        if slot is not None:
            del self.layers[key[0]][key[1]]
        return slot

    def victim(self, pos: int, skip: Callable[[Key], bool]) -> Key | None:
        """The expert to evict while layer `pos` runs, among those `skip` does not refuse (in
        use, wanted now); None if every cached expert is refused."""
        n = len(self.layers)
        for d in range(n):
            layer = (pos - d) % n
            for e in self.layers[layer]:
                if not skip((layer, e)):
                    return layer, e
        return None
