"""The books of an expert cache: which expert of a mixture of experts sits in which arena slot,
which slots are free or in use, and what the cache has read and served. One set of books,
whichever executor keeps them, as gdsllm.engine.blocks is for the KV cache:

- `LLM`'s ExpertCache (gdsllm.engine.experts) reads a missing expert and runs it at once;
- the service's ExpertScheduler (gdsllm.service.experts) keeps the same books over messages:
  reads in flight, experts lent to a block's Run, guesses read ahead.

    books = ExpertBooks(meta, slots)               # slots: gdsllm.engine.experts.ExpertSlots
    slot, gone = books.take_slot(keep, layer)      # free, else the eviction rule's victim (gone)
    books.insert((layer, expert), slot)            # now cached, most recently used of its layer
    books.hold(slot); books.unhold(slot)           # in use: never a victim meanwhile
    books.offset(slot)                             # arena byte offset of the slot

Eviction (gdsllm.engine.expert_set): from the layer whose next turn is farthest, least recently
used within it, never an expert in `keep` (wanted now) nor one whose slot is held (being run).
"""
from __future__ import annotations

from gdsllm.engine.expert_set import ExpertSet, Key

TOTALS = ("loads", "prefetch_loads", "hits", "routed", "prefetch_hits", "prefetch_misses",
          "bytes_read", "lent", "evictions")


class ExpertBooks:
    def __init__(self, meta, slots):
        self.meta, self.slots = meta, slots
        self.unit_of: dict[Key, int] = {(u.layer, u.expert): u.index for u in meta.units
                                        if u.kind == "expert"}
        self.key_of: dict[int, Key] = {i: k for k, i in self.unit_of.items()}
        # running totals (counted by the executor keeping the books): reads on demand and on a
        # guess, routed experts and hits among them, guesses routed or not, bytes read, experts a
        # block's Run lent (run with no round trip), experts evicted
        self.totals = dict.fromkeys(TOTALS, 0)
        self.reset()

    def reset(self) -> None:
        """Forget every slot (a fresh arena)."""
        self.cached = ExpertSet(self.meta.params.num_hidden_layers)  # cached expert -> slot
        self.free = list(range(self.slots.count))
        self.busy: dict[int, int] = {}  # slot -> uses in flight

    def offset(self, slot: int) -> int:
        return self.slots.offset + slot * self.slots.slot_bytes

    def slot_of(self, unit: int) -> int | None:
        """The slot holding expert unit `unit`, None if it is not cached."""
        key = self.key_of.get(unit)
        return None if key is None else self.cached.get(key)

    def take_slot(self, keep, pos: int) -> tuple[int | None, Key | None]:
        """(slot, evicted) to read into while layer `pos` runs: a free slot, else the slot of the
        eviction rule's victim among the experts not in `keep` and not held (evicted: that
        expert); (None, None) if every slot is in use."""
        if self.free:
            return self.free.pop(0), None
        key = self.cached.victim(pos, lambda k: k in keep or self.cached[k] in self.busy)
        if key is None:
            return None, None
        self.totals["evictions"] += 1
        return self.cached.remove(key), key

    def insert(self, key: Key, slot: int) -> None:
        self.cached.add(key, slot)

    def drop(self, key: Key) -> None:
        """Forget `key`; its slot is free again."""
        slot = self.cached.remove(key)
        if slot is not None:
            self.free.append(slot)

    def hold(self, slot: int) -> None:
        self.busy[slot] = self.busy.get(slot, 0) + 1

    def unhold(self, slot: int) -> None:
        if slot in self.busy:
            self.busy[slot] -= 1
            if not self.busy[slot]:
                del self.busy[slot]
