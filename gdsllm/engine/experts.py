"""Experts of a mixture-of-experts model, read only when the router picks them: the plan that
splits the budget between the dense units (embedding, attention/router blocks, head) and expert
slots, and the expert cache that fills those slots, for `gdsllm.LLM`.

    plan, cache_plan = plan_moe(meta, budget)          # dense ResidencyPlan + ExpertSlots
    cache = ExpertCache(meta, arena[cache_plan.offset:], cache_plan, loader)
    runner.run_unit(block_unit, weights)               # attention + router of layer i
    cache.run_layer(runner, layer)                     # load what is missing, run every routed one
    cache.stats()   # {"expert_loads": .., "expert_hits": .., "expert_bytes_read": .., ...}

Budget: the dense units are planned first (gdsllm.engine.planner.plan_residency, with room kept
for `num_experts_per_tok` expert slots), then every byte left becomes expert slots, up to one per
expert. The dense part runs every pass (a pinned attention byte saves a read every token), an
expert only when routed (top-k of E), so pinning the dense part first saves more reads per byte.
With no budget every expert has a slot: each is read once, the first time it is routed.

Policy (gdsllm.engine.expert_set, chosen by measurement): evict from the layer whose next turn
is farthest, least recently used within it. Within a layer the hits run first, then the misses
are loaded one at a time into a free or evicted slot and run at once, so a layer needs only one
slot whatever its union; a slot is refilled only after `runner.fence()` (its previous expert's
kernels are done).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from gdsllm.engine.expert_books import ExpertBooks
from gdsllm.engine.planner import ALIGN, ResidencyPlan, plan_residency, shared_embedding
from gdsllm.models.views import unit_tensors


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def is_moe(meta) -> bool:
    return meta.params.num_experts > 0


@dataclass(frozen=True)
class ExpertSlots:
    """Where the expert cache lives: `count` slots of `slot_bytes` from arena offset `offset`."""

    offset: int
    slot_bytes: int
    count: int

    @property
    def nbytes(self) -> int:
        return self.slot_bytes * self.count


def plan_moe(meta, budget: int | None, window: int = 1) -> tuple[ResidencyPlan, ExpertSlots]:
    """The dense units' plan (indices of `meta.units`, expert units in neither list; its
    arena_bytes include the expert slots) and the expert slots after the dense part; ValueError
    naming the smallest budget when even one slot cannot fit."""
    dense = [u for u in meta.units if u.kind != "expert"]
    experts = [u for u in meta.units if u.kind == "expert"]
    slot = _align(max(u.nbytes for u in experts))
    keep = min(meta.params.num_experts_per_tok, len(experts)) * slot
    pin = ("embed",) if shared_embedding(meta) else ()
    names, sizes = [u.name for u in dense], [u.nbytes for u in dense]
    if budget is None:
        dplan, count = plan_residency(names, sizes, None, window, pin=pin), len(experts)
    else:
        try:
            dplan = plan_residency(names, sizes, max(budget - keep, 0), window, pin=pin)
        except ValueError:  # not even with top-k slots: try with a single expert slot
            try:
                dplan = plan_residency(names, sizes, max(budget - slot, 0), window, pin=pin)
            except ValueError as e:
                raise ValueError(f"{e} (plus one expert slot of {slot} bytes)") from None
        count = min(len(experts), (budget - dplan.arena_bytes) // slot)
        assert count >= 1, (budget, dplan.arena_bytes, slot)
    idx = [u.index for u in dense]
    slots = ExpertSlots(_align(dplan.arena_bytes), slot, count)
    plan = replace(dplan, names=tuple(u.name for u in meta.units),
                   sizes=tuple(u.nbytes for u in meta.units),
                   resident_offsets={idx[u]: off for u, off in dplan.resident_offsets.items()},
                   streamed=tuple(idx[u] for u in dplan.streamed),
                   arena_bytes=slots.offset + slots.nbytes)
    assert budget is None or plan.arena_bytes <= budget, (plan.arena_bytes, budget)
    return plan, slots


class ExpertCache:
    """Expert units in `slots.count` slots of `buf` (the arena from `slots.offset` on), in the
    books the service keeps too (gdsllm.engine.expert_books: the layer whose next turn is
    farthest is evicted, LRU within it); a missing expert is read and run at once."""

    def __init__(self, meta, buf: torch.Tensor, slots: ExpertSlots, loader):
        self.meta, self.slots, self.loader = meta, slots, loader
        self.buf = buf
        self.books = ExpertBooks(meta, slots)
        self.views: dict[int, dict] = {}  # slot -> the weights of the expert it holds

    def stats(self) -> dict[str, int]:
        t = self.books.totals
        return {"expert_loads": t["loads"], "expert_hits": t["hits"], "expert_routed": t["routed"],
                "expert_bytes_read": t["bytes_read"], "expert_evictions": t["evictions"],
                "expert_slots": self.slots.count}

    def resident(self) -> set[tuple[int, int]]:
        return set(self.books.cached)

    def get(self, layer: int, expert: int, fence) -> dict:
        """The weights of expert (layer, expert), read into a slot if absent (a free one, else
        the victim of layer `layer`'s turn: `fence()` first, so its kernels have finished)."""
        key, books = (layer, expert), self.books
        slot = books.cached.get(key)
        if slot is not None:
            books.cached.touch(key)
            books.totals["hits"] += 1
            return self.views[slot]
        slot, gone = books.take_slot((), layer)
        if gone is not None:
            fence()
        unit = self.meta.units[books.unit_of[key]]
        start = books.offset(slot) - self.slots.offset
        b = self.buf[start: start + unit.nbytes]
        self.views.pop(slot, None)
        self.loader.load(unit, b)
        books.totals["loads"] += 1
        books.totals["bytes_read"] += unit.nbytes
        self.views[slot] = unit_tensors(unit, b)
        books.insert(key, slot)
        return self.views[slot]

    def run_layer(self, runner, layer: int) -> list[int]:
        """Run every expert the runner's waiting MoE block routed (hits first, then each miss
        read and run); returns the routed experts."""
        routed = runner.routed_experts()
        order = sorted(routed, key=lambda e: (layer, e) not in self.books.cached)
        for e in order:
            unit = self.meta.units[self.books.unit_of[(layer, e)]]
            runner.run_expert(unit, self.get(layer, e, runner.fence))
        self.books.totals["routed"] += len(routed)
        return routed
