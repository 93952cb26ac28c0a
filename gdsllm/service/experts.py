"""The coordinator's expert scheduler: what to load when a block's router has spoken, and when the
block's experts have all run. Which expert sits in which arena slot are the books `LLM` keeps too
(gdsllm.engine.expert_books.ExpertBooks); this adds what only messages need: reads in flight,
experts lent to a block's Run, guesses read ahead.

    ex = ExpertScheduler(meta, slots)             # slots: gdsllm.engine.experts.ExpertSlots
    run = replace(run, experts=ex.lend(block))  # the block's Run lends the layer's resident experts
    loads, runs, release = ex.on_routed(msg)   # Routed -> Load(expert unit, slot, offset)s, RunExperts
    loads, runs, release = ex.on_loaded(msg)   # an expert's Loaded -> its RunExperts
    loads, runs, release = ex.on_done(msg)     # ExpertsDone -> more
    ex.reset()                                 # new workers: an empty arena

`release` is the block unit once every routed expert has been sent to run: the pass's next Runs
may go out (the worker takes messages in order, so they run after those experts).

Per layer the compute worker runs the block unit (attention + router) and reports the union of
the experts routed for every token of the pass (`Routed`). The block's Run lent it the layer's
resident experts, so the cache hits run at once in the worker, with no round trip (their slots
stay busy until then); each missing one is read into a slot (free, else the victim of
gdsllm.engine.expert_set's rule among those not needed now: the layer whose next turn is
farthest, least recently used within it) and runs (RunExperts) as soon as it is in. A layer
needs only one slot whatever its union: a slot is refilled only after the ExpertsDone of the
expert it held. Speculative prefetch: `Routed` also carries the next layer's guess (its router
applied to this layer's hidden state); once this layer's own loads are issued, the guessed
experts not resident are read into slots the current layer does not need. A guessed expert the
next router then picks is a prefetch hit; one it does not pick is a prefetch miss (bandwidth
spent, nothing else). Why the dense units are pinned first: gdsllm.engine.experts.
"""
from __future__ import annotations

from dataclasses import dataclass

from ipc.messages import ExpertsDone, Load, Loaded, Routed, RunExperts

from gdsllm.engine.expert_books import ExpertBooks
from gdsllm.engine.expert_set import Key


@dataclass
class _Layer:
    pass_id: int
    block: int  # unit index of the MoE block waiting for its experts
    layer: int
    todo: set[int]  # routed experts not yet sent to run
    running: int = 0  # ExpertsDone outstanding
    released: bool = False  # every routed expert was sent to run: the pass went on


class ExpertScheduler:
    def __init__(self, meta, slots, prefetch: bool = True):
        self.meta, self.slots, self.prefetch = meta, slots, prefetch
        self.books = ExpertBooks(meta, slots)
        self.unit_of, self.key_of = self.books.unit_of, self.books.key_of
        self.totals = self.books.totals  # lent: routed experts the worker ran from its block's Run
        self.workers = None  # the workers whose arena the slots describe
        self.reset()

    def bind(self, workers) -> None:
        """Serve on `workers`: new ones (after a restart) bring a fresh, empty arena."""
        if workers is not self.workers:
            self.workers = workers
            self.reset()

    def reset(self) -> None:
        """Forget every slot (new workers, a fresh arena) and any block in flight."""
        self.books.reset()
        self.loading: dict[int, Key] = {}  # slot -> expert being read into it
        self.prefetched: set[Key] = set()  # read on a guess, not yet routed
        self.bad: set[Key] = set()  # failed to read: leaves the cache once it has run
        self.guess: set[Key] = set()  # the next layer's guessed experts (until its Routed)
        self.cur: _Layer | None = None
        self.lent: dict[Key, int] = {}  # lent with the Run of block `lent_block`, until its Routed
        self.lent_block: int | None = None

    @property
    def cached(self):
        """Loaded experts -> slot (the books' gdsllm.engine.expert_set.ExpertSet)."""
        return self.books.cached

    @property
    def busy(self) -> dict[int, int]:
        """Slot -> uses in flight (RunExperts outstanding, or lent to a block's Run)."""
        return self.books.busy

    # ------------------------------------------------------------------ events

    def lend(self, block: int) -> list[tuple[int, int]]:
        """[expert unit, offset] of the experts of MoE block `block`'s layer in the cache now, for
        its Run: the worker runs those its router picks without asking. Their slots stay busy
        until the block's Routed (the routed ones: until their ExpertsDone)."""
        self._unlend()
        layer = self.meta.units[block].layer
        self.lent_block = block
        self.lent = {(layer, e): self.cached[(layer, e)] for e in sorted(self.cached.of_layer(layer))
                     if (layer, e) not in self.bad}
        for slot in self.lent.values():
            self.books.hold(slot)
        return [(self.unit_of[k], self.books.offset(slot)) for k, slot in self.lent.items()]

    def _unlend(self, keep: set[Key] = frozenset()) -> dict[Key, int]:
        """End the pending lend; the slots of experts not in `keep` are free to refill."""
        lent, self.lent, self.lent_block = self.lent, {}, None
        for key, slot in lent.items():
            if key not in keep:
                self.books.unhold(slot)
        return lent

    def on_routed(self, msg: Routed) -> tuple[list[Load], list[RunExperts], int | None]:
        block = self.meta.units[msg.unit]
        if block.kind != "block" or self.cur is not None:
            raise ValueError(f"Routed for unit {msg.unit} ({block.name}) while "
                             f"{'block ' + str(self.cur.block) if self.cur else 'no MoE block'} waits")
        bad = [e for e in msg.experts + msg.predicted if not 0 <= e < self.meta.params.num_experts]
        if bad or not msg.experts:
            raise ValueError(f"Routed for {block.name}: experts {msg.experts} / {msg.predicted} "
                             f"out of range [0, {self.meta.params.num_experts})")
        layer = block.layer
        routed = {(layer, e) for e in msg.experts}
        lent_to = self.lent_block
        lent = self._unlend(keep=routed)
        if lent and lent_to != msg.unit:  # lent to another block: cannot happen in order
            raise ValueError(f"Routed for {block.name} while experts are lent to unit {lent_to}")
        ran = routed & set(lent)  # run by the worker already: one ExpertsDone to come
        t = self.totals
        t["routed"] += len(msg.experts)
        t["lent"] += len(ran)
        for key in sorted(routed):
            if key in self.cached or key in self.loading.values():
                t["hits"] += 1
            if key in self.prefetched:
                t["prefetch_hits"] += 1
                self.prefetched.discard(key)
        for key in sorted(ran):
            self.cached.touch(key)
        stale = {k for k in self.prefetched if k[0] == layer}
        t["prefetch_misses"] += len(stale)  # guessed for this layer, not routed
        self.prefetched -= stale
        last = layer + 1 >= self.meta.params.num_hidden_layers
        self.cur = _Layer(msg.pass_id, msg.unit, layer, {e for _, e in routed - ran}, int(bool(ran)))
        self.guess = set() if last or not self.prefetch else {(layer + 1, e) for e in msg.predicted}
        return self._advance()

    def on_loaded(self, msg: Loaded) -> tuple[list[Load], list[RunExperts], int | None]:
        """An expert is in its slot (or failed to read: it still runs, in a pass the scheduler
        fails, and then leaves the cache)."""
        slot = self._slot_loading(msg.unit)
        key = self.loading.pop(slot)
        self.books.insert(key, slot)  # most recently used
        self.totals["bytes_read"] += msg.nbytes
        if msg.error:
            self.bad.add(key)
            if not (self.cur and key[0] == self.cur.layer and key[1] in self.cur.todo):
                self._forget(key)
        return self._advance()

    def on_done(self, msg: ExpertsDone) -> tuple[list[Load], list[RunExperts], int | None]:
        for u in msg.experts:
            slot = self.books.slot_of(u)
            if slot is not None:
                self.books.unhold(slot)
            if self.key_of.get(u) in self.bad and slot not in self.busy:
                self._forget(self.key_of[u])
        cur = self.cur
        if cur is None or msg.pass_id != cur.pass_id:
            return [], [], None  # the late reply of a block whose pass failed (abort)
        if msg.unit != cur.block:
            raise ValueError(f"ExpertsDone for unit {msg.unit} while "
                             f"{'block ' + str(cur.block) if cur else 'no MoE block'} waits")
        cur.running -= 1
        if not cur.todo and not cur.running:
            self.cur = None  # done: the slots it held may take the next layer's guesses
            return self._prefetch(set()), [], None
        return self._advance()

    def abort(self) -> None:
        """The pass failed: no more Runs of this block are waited for (slots in flight stay busy
        until their replies, which still come; lent ones that will not run are free)."""
        self.cur, self.guess = None, set()
        self._unlend()

    # ------------------------------------------------------------------ the policy

    def _slot_loading(self, unit: int) -> int:
        key = self.key_of.get(unit)
        for slot, k in self.loading.items():
            if k == key:
                return slot
        raise ValueError(f"Loaded for expert unit {unit}, which is not being loaded")

    def _take_slot(self, keep: set[Key], pos: int) -> int | None:
        """A slot to read into while layer `pos` runs (the books' rule); None if every slot is in
        use. An evicted guess is no longer one."""
        slot, gone = self.books.take_slot(keep, pos)
        self.prefetched.discard(gone)
        return slot

    def _forget(self, key: Key) -> None:
        """`key` leaves the cache (a failed read, once it has run); its slot is free."""
        self.prefetched.discard(key)
        self.books.drop(key)
        self.bad.discard(key)

    def _load(self, key: Key, slot: int, prefetch: bool) -> Load:
        self.loading[slot] = key
        self.totals["prefetch_loads" if prefetch else "loads"] += 1
        if prefetch:
            self.prefetched.add(key)
        return Load(self.unit_of[key], slot, self.books.offset(slot))

    def _advance(self) -> tuple[list[Load], list[RunExperts], int | None]:
        cur = self.cur
        if cur is None:
            return [], [], None
        loads, runs = self._issue(cur)
        if cur.todo or cur.released:
            return loads, runs, None
        cur.released = True
        return loads, runs, cur.block

    def _issue(self, cur: _Layer) -> tuple[list[Load], list[RunExperts]]:
        layer = cur.layer
        ready = sorted(e for e in cur.todo if (layer, e) in self.cached)
        runs = []
        if ready:
            for e in ready:
                slot = self.cached[(layer, e)]
                self.cached.touch((layer, e))
                self.books.hold(slot)
            cur.todo -= set(ready)
            cur.running += 1
            runs.append(RunExperts(cur.pass_id, cur.block, [
                (self.unit_of[(layer, e)], self.books.offset(self.cached[(layer, e)])) for e in ready]))
        loads = []
        needed = {(layer, e) for e in cur.todo}
        loading = set(self.loading.values())
        for key in sorted(needed - loading):
            slot = self._take_slot(needed, layer)
            if slot is None:
                return loads, runs  # the rest waits for a slot to come back
            loads.append(self._load(key, slot, prefetch=False))
        return loads + self._prefetch(needed), runs

    def _prefetch(self, needed: set[Key]) -> list[Load]:
        """Reads of the guessed experts not in, into slots the current layer does not need."""
        loads = []
        for key in sorted(self.guess - set(self.cached) - set(self.loading.values())):
            slot = self._take_slot(needed | self.guess, key[0] - 1)
            if slot is None:
                break
            loads.append(self._load(key, slot, prefetch=True))
        return loads
