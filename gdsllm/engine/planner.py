"""The planner: which units stay resident, where everything lives in the arena, and when to load
and run each streamed unit. Pure logic, no I/O: the coordinator feeds it events and sends the
Loads and Runs it returns as messages (ipc's Load and Run, the same fields).

    plan = plan_residency(names, sizes, budget=parse_size("2GiB"), window=2)
    plan = plan_for(meta, budget, window)   # the same for a model: its tied embedding pinned
    sched = StreamSchedule(plan)
    loads, runs = sched.step()          # Load(...)s for the I/O worker (prefetch), nothing to run yet
    sched.begin_pass(); loads, runs = sched.step()   # Run(...)s for the compute worker
    sched.on_loaded(unit, slot); sched.on_done(unit, slot); ...  then step() again
    if sched.may_queue: runs = sched.queue_pass()   # all resident: the next pass, sent behind

Why static residency (DESIGN.md): decoding visits units in the same cycle every token, so LRU would
evict exactly the unit needed next. The budget pins embed and head first (touched every pass and
often the largest), then blocks in order while they fit beside W streaming slots sized for the
largest streamed unit; the rest rotate through the slots. Streamed units form one endless cyclic
sequence (pass p, streamed unit j -> sequence number p*m + j, slot seq % W), so the loads of the
next pass start as soon as a slot frees, before the current pass has even sampled its tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

RESIDENT = -1  # the slot of a resident unit (no streaming slot); ipc's messages use the same value


@dataclass(frozen=True)
class Load:
    """Read `unit` into the arena at byte `offset` (streaming slot `slot`, or RESIDENT)."""

    unit: int
    slot: int
    offset: int


@dataclass(frozen=True)
class Run:
    """Run `unit` (and the `count` - 1 resident units after it) over the arena at `offset`."""

    unit: int
    slot: int
    offset: int
    count: int = 1


ALIGN = 4096  # arena offsets: O_DIRECT and cuFile want 4 KiB-aligned destinations


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class ResidencyPlan:
    """Where every unit lives in the arena (bytes, 4 KiB aligned).

    `resident_offsets[u]`: arena offset of resident unit u. `streamed`: unit indices streamed every
    pass, in order. `slot_offsets[s]`: arena offset of streaming slot s, each `slot_bytes` long.
    """

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    budget: int | None
    window: int
    resident_offsets: dict[int, int]
    streamed: tuple[int, ...]
    slot_bytes: int
    slot_offsets: tuple[int, ...]
    arena_bytes: int

    @property
    def num_units(self) -> int:
        return len(self.sizes)

    @property
    def num_slots(self) -> int:
        return len(self.slot_offsets)

    @property
    def resident_bytes(self) -> int:
        return sum(self.sizes[u] for u in self.resident_offsets)

    @property
    def resident_names(self) -> list[str]:
        return [self.names[u] for u in sorted(self.resident_offsets)]

    @property
    def streamed_bytes_per_pass(self) -> int:
        return sum(self.sizes[u] for u in self.streamed)


def _need(sizes, pinned: set[int], window: int) -> int:
    streamed = [sizes[u] for u in range(len(sizes)) if u not in pinned]
    slots = min(window, len(streamed))
    return sum(_align(sizes[u]) for u in pinned) + slots * (_align(max(streamed)) if streamed else 0)


def shared_embedding(meta) -> bool:
    """A tied model stored once (gdsllm.format.metadata): its head unit holds no LM head and
    multiplies by the embed unit's table (older directories hold a copy in the head)."""
    return all(t.name != "lm_head.weight" for t in meta.units[-1].tensors)


def plan_for(meta, budget: int | None, window: int) -> ResidencyPlan:
    """The plan of a model (gdsllm.format.metadata.ModelMeta), for the service and gdsllm.LLM.

    A tied model's head reads the embedding table, so the embed unit is pinned whatever the
    budget: streaming it instead would read the same bytes twice per pass (for the embedding,
    then for the head) and would need a second slot kept for it from the first unit of a pass to
    the last; pinned, its views simply stay valid for the whole pass in every process (the
    compute worker checks this), and the planner's own first choice is to pin it anyway.
    """
    pin = ("embed",) if shared_embedding(meta) else ()
    return plan_residency([u.name for u in meta.units], [u.nbytes for u in meta.units], budget,
                          window, pin=pin)


def plan_residency(names, sizes, budget: int | None, window: int, pin=()) -> ResidencyPlan:
    """Pin embed and head first, then blocks in order, as far as the pinned units plus `window`
    slots of the largest still-streamed unit fit `budget` bytes (None: everything resident).
    Units named in `pin` are resident whatever the budget.

    Every prefix of that order is weighed and the one streaming the fewest bytes per pass wins:
    pinning only the embedding can need MORE memory than pinning nothing (the head, as large, still
    sets the slot size), while pinning both shrinks every slot to a block. Fewer than `window` slots
    are made when fewer units are streamed. Raises ValueError naming the smallest budget that works.
    """
    names, sizes = tuple(names), tuple(int(s) for s in sizes)
    assert len(names) == len(sizes) >= 1, (names, sizes)
    if window < 1:
        raise ValueError(f"prefetch window must be at least 1, got {window}")
    n = len(sizes)
    order = [i for i, nm in enumerate(names) if nm in ("embed", "head")]
    order += [i for i in range(n) if i not in order]
    must = {i for i, nm in enumerate(names) if nm in pin}
    if budget is None:
        pinned = set(range(n))
    else:
        prefixes = [set(order[:k]) | must for k in range(n + 1)]
        fits = [p for p in prefixes if _need(sizes, p, window) <= budget]
        if not fits:
            minimum = min(_need(sizes, p, window) for p in prefixes)
            big = max(range(n), key=lambda u: sizes[u])
            raise ValueError(
                f"--vram-budget {budget} bytes is too small: it needs at least {minimum} bytes "
                f"({min(window, n)} streaming slot(s); the largest unit is {names[big]}, "
                f"{sizes[big]} bytes{''.join(f'; {names[u]} stays resident' for u in sorted(must))}"
                f"); raise the budget or lower --prefetch-window")
        # fewest streamed bytes per pass; on a tie, the longer prefix (more resident)
        pinned = min(fits, key=lambda p: (sum(sizes[u] for u in range(n) if u not in p), -len(p)))
    offsets, off = {}, 0
    for u in sorted(pinned):
        offsets[u] = off
        off += _align(sizes[u])
    streamed = tuple(u for u in range(n) if u not in pinned)
    slot_bytes = _align(max(sizes[u] for u in streamed)) if streamed else 0
    slots = tuple(off + s * slot_bytes for s in range(min(window, len(streamed))))
    arena = off + len(slots) * slot_bytes
    assert budget is None or arena <= budget, (arena, budget)
    return ResidencyPlan(names, sizes, budget, window, offsets, streamed, slot_bytes, slots,
                         max(arena, ALIGN))


class StreamSchedule:
    """The streaming state machine over a ResidencyPlan (see the module docstring).

    Slot states: free -> loading (Load sent) -> loaded (Loaded received) -> running (Run sent) ->
    free (Done received). Invariants, asserted: at most `num_slots` loads in flight or slots
    occupied; a slot is loaded again only after the Done of its previous unit; resident units are
    never streamed; Runs go out in unit order, each streamed one only after its Loaded.
    """

    def __init__(self, plan: ResidencyPlan):
        self.plan = plan
        self.m = len(plan.streamed)
        self.w = plan.num_slots
        self.slot_seq: list[int | None] = [None] * self.w  # sequence number occupying each slot
        self.slot_state: list[str] = ["free"] * self.w
        self.next_load = 0  # sequence number of the next streamed load
        self.next_run = 0   # sequence number of the next streamed run
        self.pass_pos: int | None = None  # next unit index to run in the current pass, None: idle
        self.runs_outstanding = 0  # Runs sent whose Done has not arrived
        self.passes = 0
        # A mixture of experts (gdsllm.engine.experts): expert units are never streamed here nor
        # Run (the expert scheduler loads the routed ones); after a MoE block's Run the next Runs
        # wait until `release(block)`, once its experts have run.
        n = plan.num_units
        self.skip = frozenset(u for u in range(n) if ".expert." in plan.names[u])
        self.gates = frozenset(u for u in range(n - 1) if u + 1 in self.skip and u not in self.skip)
        self.held: int | None = None  # the MoE block whose experts the pass waits for
        self.ungated = False  # the pass failed: no experts run, nothing waits for them
        # A pass queued behind the running one (the engine scheduler's pass ahead): the Runs of
        # it sent (and not yet Done once the running pass is over), None when none is queued.
        self.queued: int | None = None

    # ------------------------------------------------------------ queries

    @property
    def pass_running(self) -> bool:
        return self.pass_pos is not None

    @property
    def slots_in_flight(self) -> int:
        return sum(s != "free" for s in self.slot_state)

    @property
    def loads_in_flight(self) -> int:
        return sum(s == "loading" for s in self.slot_state)

    @property
    def waiting_on_storage(self) -> bool:
        """Compute is idle because the next unit of the running pass is not loaded yet (a stall)."""
        if self.pass_pos is None or self.runs_outstanding or self.pass_pos >= self.plan.num_units:
            return False
        if self.held is not None:
            return False  # waiting on the experts (gdsllm.service.experts accounts for those)
        return self.pass_pos not in self.plan.resident_offsets

    def _unit(self, seq: int) -> int:
        return self.plan.streamed[seq % self.m]

    def _slot(self, seq: int) -> int:
        return seq % self.w

    # ------------------------------------------------------------ events

    def release(self, unit: int) -> None:
        """The experts of MoE block `unit` have run: the pass's next Runs may go out."""
        assert self.held == unit, f"release({unit}) but the pass waits on {self.held}"
        self.held = None

    def ungate(self) -> None:
        """The running pass failed (its Runs come back Done without computing, no experts run):
        stop holding Runs after MoE blocks until the pass ends."""
        self.ungated, self.held = True, None

    @property
    def may_queue(self) -> bool:
        """A whole pass may be sent behind the running one now: nothing streams (no slots, no
        experts), the running pass has sent all its Runs, and no pass is queued yet."""
        return (self.m == 0 and not self.skip and self.queued is None
                and self.pass_pos == self.plan.num_units and self.held is None)

    def queue_pass(self) -> list[Run]:
        """Begin the next pass behind the running one (may_queue): all its Runs, resident."""
        assert self.may_queue, "a pass is queued only behind a running all-resident pass"
        self.pass_pos, running = 0, self.runs_outstanding
        _, runs = self.step()
        self.queued = self.runs_outstanding - running
        return runs

    def begin_pass(self) -> None:
        assert self.pass_pos is None, "a pass is already running"
        self.ungated = False
        assert self.next_run == self.passes * self.m, (self.next_run, self.passes, self.m)
        self.pass_pos = 0

    def on_loaded(self, unit: int, slot: int) -> None:
        assert 0 <= slot < self.w, f"Loaded for unknown slot {slot}"
        seq = self.slot_seq[slot]
        assert self.slot_state[slot] == "loading" and seq is not None and self._unit(seq) == unit, \
            f"Loaded(unit={unit}, slot={slot}) but the slot is {self.slot_state[slot]} with seq {seq}"
        self.slot_state[slot] = "loaded"

    def on_done(self, unit: int, slot: int) -> bool:
        """Record a Done; returns True when it completed the running pass."""
        assert self.runs_outstanding > 0, f"Done(unit={unit}) without a Run outstanding"
        if slot == RESIDENT:
            assert unit in self.plan.resident_offsets, f"Done(unit={unit}) as resident, but it is streamed"
        else:
            seq = self.slot_seq[slot]
            assert self.slot_state[slot] == "running" and seq is not None and self._unit(seq) == unit, \
                f"Done(unit={unit}, slot={slot}) but the slot is {self.slot_state[slot]} with seq {seq}"
            self.slot_state[slot], self.slot_seq[slot] = "free", None
        self.runs_outstanding -= 1
        if self.pass_pos == self.plan.num_units and self.runs_outstanding == (self.queued or 0):
            if self.queued is None:
                self.pass_pos = None
            else:  # the queued pass runs now, every Run of it sent
                self.queued = None
                self.ungated = False
            self.passes += 1
            return True
        return False

    def step(self) -> tuple[list[Load], list[Run]]:
        """The Loads and Runs that may be issued now (call after every event)."""
        loads: list[Load] = []
        while self.m and self.slot_state[self._slot(self.next_load)] == "free":
            # Loads run ahead of the runs by at most W: the slot of seq is free only once the
            # unit W sequence numbers earlier is Done, across pass boundaries too.
            seq, slot = self.next_load, self._slot(self.next_load)
            unit = self._unit(seq)
            assert unit not in self.plan.resident_offsets, f"resident unit {unit} streamed"
            assert seq - self.next_run < self.w, (seq, self.next_run, self.w)
            self.slot_state[slot], self.slot_seq[slot] = "loading", seq
            loads.append(Load(unit, slot, self.plan.slot_offsets[slot]))
            self.next_load += 1
        runs: list[Run] = []
        while self.pass_pos is not None and self.held is None and self.pass_pos < self.plan.num_units:
            unit = self.pass_pos
            if unit in self.skip:
                self.pass_pos += 1
                continue
            if unit in self.plan.resident_offsets:
                # Consecutive resident units go as one Run: one message (and on CUDA one graph
                # replay) instead of one per unit.
                count = 1
                while unit + count in self.plan.resident_offsets:
                    count += 1
                runs.append(Run(unit, RESIDENT, self.plan.resident_offsets[unit], count))
                self.pass_pos += count - 1
            else:
                slot = self._slot(self.next_run)
                if self.slot_state[slot] != "loaded":
                    break
                assert self.slot_seq[slot] == self.next_run and self._unit(self.next_run) == unit
                self.slot_state[slot] = "running"
                runs.append(Run(unit, slot, self.plan.slot_offsets[slot]))
                self.next_run += 1
            self.pass_pos += 1
            self.runs_outstanding += 1
            if self.pass_pos - 1 in self.gates and not self.ungated:  # the run ends at a MoE block
                self.held = self.pass_pos - 1
        assert self.slots_in_flight <= self.w
        return loads, runs

    def resident_loads(self) -> list[Load]:
        """The one-time loads of every resident unit, issued at start-up."""
        return [Load(u, RESIDENT, off) for u, off in sorted(self.plan.resident_offsets.items())]
