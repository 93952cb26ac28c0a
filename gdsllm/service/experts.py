"""The coordinator's expert scheduler: which expert of a mixture of experts sits in which arena
slot, what to load when a block's router has spoken, and when the block's experts have all run.

    ex = ExpertScheduler(meta, slots, metrics)    # slots: gdsllm.engine.experts.ExpertSlots
    loads, runs = ex.on_routed(msg)      # Routed -> Load(expert unit, slot, offset)s, RunExperts
    loads, runs = ex.on_loaded(msg)      # an expert's Loaded -> its RunExperts
    loads, runs, block = ex.on_done(msg) # ExpertsDone -> more; block: every routed expert ran
    ex.reset()                           # new workers: an empty arena

Per layer the compute worker runs the block unit (attention + router) and reports the union of
the experts routed for every token of the pass (`Routed`); the resident ones run at once (cache
hits), each missing one is read into a slot (free, else least recently used among those not
needed now) and runs as soon as it is in. A layer needs only one slot whatever its union: a slot
is refilled only after the ExpertsDone of the expert it held. Speculative prefetch: `Routed`
also carries the next layer's guess (its router applied to this layer's hidden state); once
this layer's own loads are issued, the guessed experts not resident are read into slots the
current layer does not need. A guessed expert the next router then picks is a prefetch hit; one
it does not pick is a prefetch miss (bandwidth spent, nothing else). Policy: LRU (see
gdsllm.engine.experts for why the dense units are pinned first).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import logging

from ipc.messages import ExpertsDone, Load, Loaded, Routed, RunExperts, encode

log = logging.getLogger("gdsllm.service.experts")

Key = tuple[int, int]  # (layer, expert)


@dataclass
class _Layer:
    pass_id: int
    block: int  # unit index of the MoE block waiting for its experts
    layer: int
    todo: set[int]  # routed experts not yet sent to run
    running: int = 0  # RunExperts outstanding


class ExpertScheduler:
    def __init__(self, meta, slots, metrics=None, prefetch: bool = True):
        self.meta, self.slots, self.metrics, self.prefetch = meta, slots, metrics, prefetch
        self.unit_of: dict[Key, int] = {(u.layer, u.expert): u.index for u in meta.units
                                        if u.kind == "expert"}
        self.key_of = {i: k for k, i in self.unit_of.items()}
        self.workers = None  # the workers whose arena the slots describe
        self.totals = dict.fromkeys(("loads", "prefetch_loads", "hits", "routed", "prefetch_hits",
                                     "prefetch_misses", "bytes_read"), 0)
        self.reset()

    def bind(self, workers) -> None:
        """Serve on `workers`: new ones (after a restart) bring a fresh, empty arena."""
        if workers is not self.workers:
            self.workers = workers
            self.reset()

    def reset(self) -> None:
        """Forget every slot (new workers, a fresh arena) and any block in flight."""
        self.lru: OrderedDict[Key, int] = OrderedDict()  # loaded experts -> slot, oldest first
        self.loading: dict[int, Key] = {}  # slot -> expert being read into it
        self.busy: dict[int, int] = {}  # slot -> RunExperts outstanding that read it
        self.free = list(range(self.slots.count))
        self.prefetched: set[Key] = set()  # read on a guess, not yet routed
        self.bad: set[Key] = set()  # failed to read: leaves the cache once it has run
        self.guess: set[Key] = set()  # the next layer's guessed experts (until its Routed)
        self.cur: _Layer | None = None

    def offset(self, slot: int) -> int:
        return self.slots.offset + slot * self.slots.slot_bytes

    def slot_of(self, unit: int) -> int | None:
        key = self.key_of.get(unit)
        return None if key is None else self.lru.get(key)

    # ------------------------------------------------------------------ events

    def on_routed(self, msg: Routed) -> tuple[list[Load], list[RunExperts]]:
        block = self.meta.units[msg.unit]
        if block.kind != "block" or self.cur is not None:
            raise ValueError(f"Routed for unit {msg.unit} ({block.name}) while "
                             f"{'block ' + str(self.cur.block) if self.cur else 'no MoE block'} waits")
        bad = [e for e in msg.experts + msg.predicted if not 0 <= e < self.meta.params.num_experts]
        if bad or not msg.experts:
            raise ValueError(f"Routed for {block.name}: experts {msg.experts} / {msg.predicted} "
                             f"out of range [0, {self.meta.params.num_experts})")
        layer = block.layer
        t = self.totals
        t["routed"] += len(msg.experts)
        for e in msg.experts:
            key = (layer, e)
            if key in self.lru or key in self.loading.values():
                t["hits"] += 1
            if key in self.prefetched:
                t["prefetch_hits"] += 1
                self.prefetched.discard(key)
        stale = {k for k in self.prefetched if k[0] == layer}
        t["prefetch_misses"] += len(stale)  # guessed for this layer, not routed
        self.prefetched -= stale
        last = layer + 1 >= self.meta.params.num_hidden_layers
        self.cur = _Layer(msg.pass_id, msg.unit, layer, set(msg.experts))
        self.guess = set() if last or not self.prefetch else {(layer + 1, e) for e in msg.predicted}
        return self._advance()

    def on_loaded(self, msg: Loaded) -> tuple[list[Load], list[RunExperts]]:
        """An expert is in its slot (or failed to read: it still runs, in a pass the scheduler
        fails, and then leaves the cache)."""
        slot = self._slot_loading(msg.unit)
        key = self.loading.pop(slot)
        self.lru[key] = slot  # most recently used
        self.totals["bytes_read"] += msg.nbytes
        if msg.error:
            self.bad.add(key)
            if not (self.cur and key[0] == self.cur.layer and key[1] in self.cur.todo):
                self._drop(key)
        return self._advance()

    def _drop(self, key: Key) -> None:
        slot = self.lru.pop(key, None)
        self.bad.discard(key)
        self.prefetched.discard(key)
        if slot is not None:
            self.free.append(slot)

    def on_done(self, msg: ExpertsDone) -> tuple[list[Load], list[RunExperts], int | None]:
        for u in msg.experts:
            slot = self.slot_of(u)
            if slot is not None and slot in self.busy:
                self.busy[slot] -= 1
                if not self.busy[slot]:
                    del self.busy[slot]
            if self.key_of.get(u) in self.bad and slot not in self.busy:
                self._drop(self.key_of[u])
        cur = self.cur
        if cur is None or msg.pass_id != cur.pass_id:
            return [], [], None  # the late reply of a block whose pass failed (abort)
        if msg.unit != cur.block:
            raise ValueError(f"ExpertsDone for unit {msg.unit} while "
                             f"{'block ' + str(cur.block) if cur else 'no MoE block'} waits")
        cur.running -= 1
        if not cur.todo and not cur.running:
            self.cur = None  # done: the slots it held may take the next layer's guesses
            return self._prefetch(set()), [], cur.block
        loads, runs = self._advance()
        return loads, runs, None

    def abort(self) -> None:
        """The pass failed: no more Runs of this block are waited for (slots in flight stay busy
        until their replies, which still come)."""
        self.cur, self.guess = None, set()

    # ------------------------------------------------------------------ the policy

    def _slot_loading(self, unit: int) -> int:
        key = self.key_of.get(unit)
        for slot, k in self.loading.items():
            if k == key:
                return slot
        raise ValueError(f"Loaded for expert unit {unit}, which is not being loaded")

    def _take_slot(self, keep: set[Key]) -> int | None:
        """A slot to read into: a free one, else the least recently used expert's that is not
        being run, loaded, nor in `keep`; None if every slot is in use."""
        if self.free:
            return self.free.pop(0)
        for key, slot in self.lru.items():
            if key not in keep and slot not in self.busy:
                del self.lru[key]
                self.prefetched.discard(key)
                return slot
        return None

    def _load(self, key: Key, slot: int, prefetch: bool) -> Load:
        self.loading[slot] = key
        self.totals["prefetch_loads" if prefetch else "loads"] += 1
        if prefetch:
            self.prefetched.add(key)
        return Load(self.unit_of[key], slot, self.offset(slot))

    def _advance(self) -> tuple[list[Load], list[RunExperts]]:
        cur = self.cur
        if cur is None:
            return [], []
        layer = cur.layer
        ready = sorted(e for e in cur.todo if (layer, e) in self.lru)
        runs = []
        if ready:
            for e in ready:
                slot = self.lru[(layer, e)]
                self.lru.move_to_end((layer, e))
                self.busy[slot] = self.busy.get(slot, 0) + 1
            cur.todo -= set(ready)
            cur.running += 1
            runs.append(RunExperts(cur.pass_id, cur.block, [
                (self.unit_of[(layer, e)], self.offset(self.lru[(layer, e)])) for e in ready]))
        loads = []
        needed = {(layer, e) for e in cur.todo}
        loading = set(self.loading.values())
        for key in sorted(needed - loading):
            slot = self._take_slot(needed)
            if slot is None:
                return loads, runs  # the rest waits for a slot to come back
            loads.append(self._load(key, slot, prefetch=False))
        return loads + self._prefetch(needed), runs

    def _prefetch(self, needed: set[Key]) -> list[Load]:
        """Reads of the guessed experts not in, into slots the current layer does not need."""
        loads = []
        for key in sorted(self.guess - set(self.lru) - set(self.loading.values())):
            slot = self._take_slot(needed | self.guess)
            if slot is None:
                break
            loads.append(self._load(key, slot, prefetch=True))
        return loads


# ---------------------------------------------------------------- gdsllm.service.scheduler's hooks


def expert_loaded(sched, msg) -> bool:
    """An expert unit's Loaded, on the BatchScheduler `sched`; False for any other message."""
    if sched.experts is None or not isinstance(msg, Loaded) or msg.unit not in sched.experts.key_of:
        return False
    sched.experts.bind(sched.workers)
    if msg.error:  # its pass fails at its result; the expert leaves the cache once it has run
        log.error("pass %d: %s", sched.pass_id, msg.error)
        sched.poisoned.setdefault(sched.pass_id, msg.error)
    else:
        sched.metrics.observe_load(msg.nbytes, msg.seconds, msg.io_path)
    _send(sched, *sched.experts.on_loaded(msg))
    sched.metrics.set_experts(sched.experts.totals)
    return True


def expert_reply(sched, msg) -> bool:
    """Routed / ExpertsDone from the compute worker, on the BatchScheduler `sched`; False for
    any other message."""
    if not isinstance(msg, (Routed, ExpertsDone)):
        return False
    ex = sched.experts
    if ex is None:
        sched.fault(f"compute worker sent {type(msg).__name__} for a dense model", "internal")
        return True
    ex.bind(sched.workers)
    if sched.sched.ungated or msg.pass_id != sched.pass_id:
        if isinstance(msg, ExpertsDone):
            ex.on_done(msg)  # a failed pass's late reply: frees its slots
        return True
    try:
        if isinstance(msg, Routed):
            (loads, runs), block = ex.on_routed(msg), None
        else:
            sched.metrics.observe_compute(msg.seconds)
            loads, runs, block = ex.on_done(msg)
    except ValueError as e:
        sched.fault(f"compute worker: {e}", "internal")
        return True
    _send(sched, loads, runs)
    if block is not None:  # every routed expert ran: the pass goes on
        sched.sched.release(block)
        sched.pump()
    sched.metrics.set_experts(ex.totals)
    return True


def expert_pass_failed(sched, msg) -> None:
    """A compute WorkerError about the running pass: its MoE blocks send no Routed any more, so
    the schedule stops waiting for experts (their Runs come back Done without computing)."""
    if sched.experts is not None and msg.pass_id == sched.pass_id:
        sched.experts.bind(sched.workers)
        sched.experts.abort()
        sched.sched.ungate()
        sched.pump()


def _send(sched, loads: list[Load], runs: list[RunExperts]) -> None:
    if sched.paused:
        return
    for ld in loads:
        sched.workers.io.send(encode(ld))
    for r in runs:
        sched.workers.compute.send(encode(r))
