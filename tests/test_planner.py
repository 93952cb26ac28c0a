"""The residency plan and the streaming schedule, driven by stand-in workers.

The stand-ins are asyncio tasks that behave like the real workers with random latencies: an I/O
worker with several reads in flight that "writes" the unit number into a simulated arena, and a
compute worker that runs Runs in order and checks the bytes under it stay its unit's until Done.
"""
from __future__ import annotations

import asyncio
import random

import pytest

from gdsllm.engine.planner import ALIGN, RESIDENT, StreamSchedule, plan_residency

MB = 1 << 20


def model_units(layers=6, embed=3 * MB, block=2 * MB, head=3 * MB):
    names = ["embed"] + [f"block.{i}" for i in range(layers)] + ["head"]
    return names, [embed] + [block] * layers + [head]


def test_everything_resident_without_budget():
    names, sizes = model_units()
    plan = plan_residency(names, sizes, None, 2)
    assert plan.streamed == () and plan.num_slots == 0
    assert plan.resident_names == names
    assert plan.arena_bytes == sum(sizes)


def test_embed_and_head_pinned_first_then_blocks_in_order():
    names, sizes = model_units()
    # embed + head (6 MB) + 2 blocks (4 MB) + 2 slots (4 MB) = 14 MB
    plan = plan_residency(names, sizes, 14 * MB, 2)
    assert plan.resident_names == ["embed", "block.0", "block.1", "head"]
    assert [names[u] for u in plan.streamed] == ["block.2", "block.3", "block.4", "block.5"]
    assert plan.num_slots == 2 and plan.slot_bytes == 2 * MB
    assert plan.arena_bytes <= 14 * MB


def test_arena_layout_is_aligned_and_disjoint():
    names, sizes = model_units(embed=3 * MB + 4096, block=MB + 8192)
    plan = plan_residency(names, sizes, 10 * MB, 3)
    spans = [(off, off + sizes[u]) for u, off in plan.resident_offsets.items()]
    spans += [(off, off + plan.slot_bytes) for off in plan.slot_offsets]
    for a, b in spans:
        assert a % ALIGN == 0 and b <= plan.arena_bytes
    spans.sort()
    for (a0, a1), (b0, _) in zip(spans, spans[1:]):
        assert a1 <= b0, "arena regions overlap"
    assert plan.slot_bytes >= max(sizes[u] for u in plan.streamed)


def test_pinning_embed_and_head_shrinks_the_slots():
    # SmolLM2-like: embedding and head 8x a block. Pinning only the embedding would need more than
    # pinning nothing (the head still sets the slot size); pinning both shrinks every slot.
    names, sizes = model_units(layers=30, embed=8 * MB, block=MB, head=8 * MB)
    plan = plan_residency(names, sizes, 26 * MB, 3)
    assert plan.resident_names[0] == "embed" and plan.resident_names[-1] == "head"
    assert plan.resident_names[1:-1] == [f"block.{i}" for i in range(7)]  # 16 + 7 + 3 slots = 26
    assert plan.slot_bytes == MB and plan.num_slots == 3


def test_one_slot_minimum_budget_streams_everything():
    names, sizes = model_units()
    plan = plan_residency(names, sizes, 3 * MB, 1)
    assert plan.resident_offsets == {} and len(plan.streamed) == len(names) and plan.num_slots == 1


def test_pinned_units_stay_resident_whatever_the_budget():
    # a tied model's embed unit: pinned even where streaming everything would stream fewer bytes
    names, sizes = model_units(embed=3 * MB, head=MB // 2)
    plan = plan_residency(names, sizes, 5 * MB, 1, pin=("embed",))
    assert plan.resident_names[0] == "embed" and plan.arena_bytes <= 5 * MB
    assert 0 not in plan.streamed and plan.num_slots == 1
    with pytest.raises(ValueError, match="too small.*embed stays resident"):
        plan_residency(names, sizes, 4 * MB, 1, pin=("embed",))  # 3 MB pinned + a 2 MB slot
    assert plan_residency(names, sizes, 4 * MB, 1).resident_offsets == {}  # unpinned: a 3 MB slot


def test_too_small_budget_is_a_clear_error():
    names, sizes = model_units()
    with pytest.raises(ValueError, match="too small.*largest unit is embed"):
        plan_residency(names, sizes, 5 * MB, 2)


def test_fewer_slots_than_window_when_few_units_stream():
    names, sizes = model_units(layers=2, embed=MB, head=MB, block=MB)
    # 4 slots for 4 streamed units would hold the whole model: pinning wins, no slots at all
    plan = plan_residency(names, sizes, 4 * MB, 4)
    assert plan.streamed == () and plan.num_slots == 0 and plan.arena_bytes == 4 * MB
    names, sizes = model_units(layers=4, embed=MB, head=MB, block=MB)
    plan = plan_residency(names, sizes, 5 * MB, 3)  # block.0 would leave 3 streamed: 3 + 3 > 5
    assert plan.resident_names == ["embed", "head"] and plan.num_slots == 3
    plan = plan_residency(names, sizes, 6 * MB - 1, 3)
    assert plan.resident_names == ["embed", "head"]


class StandIns:
    """A stand-in I/O worker and compute worker around one StreamSchedule."""

    def __init__(self, sched: StreamSchedule, rng: random.Random):
        self.sched, self.rng = sched, rng
        self.arena: dict[int, int | None] = {s: None for s in range(sched.w)}  # slot -> unit bytes
        self.computing: set[int] = set()
        self.run_q: asyncio.Queue = asyncio.Queue()
        self.events: asyncio.Queue = asyncio.Queue()
        self.max_slots_busy = 0
        self.max_loads = 0
        self.loads: list[tuple[int, int, int]] = []  # (pass index when issued, unit, pass running)
        self.runs_per_pass: list[list[int]] = []
        self.loaded_before_begin: list[int] = []  # per pass: streamed loads issued before it began

    async def load(self, msg):
        assert msg.slot not in self.computing, f"slot {msg.slot} reloaded while compute uses it"
        assert msg.slot != RESIDENT and msg.unit not in self.sched.plan.resident_offsets
        self.arena[msg.slot] = None  # the bytes are being overwritten
        await asyncio.sleep(self.rng.random() * 0.002)
        assert msg.slot not in self.computing
        self.arena[msg.slot] = msg.unit
        await self.events.put(("loaded", msg.unit, msg.slot))

    async def compute(self):
        while True:
            msg = await self.run_q.get()
            if msg.slot != RESIDENT:
                assert self.arena[msg.slot] == msg.unit, f"slot {msg.slot} does not hold unit {msg.unit}"
                self.computing.add(msg.slot)
            await asyncio.sleep(self.rng.random() * 0.002)
            if msg.slot != RESIDENT:
                assert self.arena[msg.slot] == msg.unit, f"slot {msg.slot} overwritten during unit {msg.unit}"
                self.computing.discard(msg.slot)
            self.runs_per_pass[-1].extend(range(msg.unit, msg.unit + msg.count))
            await self.events.put(("done", msg.unit, msg.slot))

    def issue(self, tasks):
        loads, runs = self.sched.step()
        for ld in loads:
            self.loads.append((self.sched.passes, ld.unit, self.sched.pass_running))
            tasks.append(asyncio.create_task(self.load(ld)))
        for r in runs:
            self.run_q.put_nowait(r)
        self.max_slots_busy = max(self.max_slots_busy, self.sched.slots_in_flight)
        self.max_loads = max(self.max_loads, self.sched.loads_in_flight)

    async def run(self, passes: int):
        tasks = [asyncio.create_task(self.compute())]
        self.issue(tasks)
        for p in range(passes):
            self.loaded_before_begin.append(self.sched.next_load - p * self.sched.m)
            self.sched.begin_pass()
            self.runs_per_pass.append([])
            self.issue(tasks)
            while True:
                kind, unit, slot = await self.events.get()
                finished = (self.sched.on_loaded(unit, slot) if kind == "loaded"
                            else self.sched.on_done(unit, slot))
                self.issue(tasks)
                if finished:
                    break
            # "sampling": the next pass starts later; meanwhile loads complete and get recorded.
            await asyncio.sleep(self.rng.random() * 0.003)
            while not self.events.empty():
                kind, unit, slot = self.events.get_nowait()
                assert kind == "loaded"
                self.sched.on_loaded(unit, slot)
                self.issue(tasks)
        for t in tasks:
            t.cancel()


@pytest.mark.parametrize("window", [1, 2, 3, 4])
@pytest.mark.parametrize("budget_mb", ["min", 12, 14, 18, None])
async def test_schedule_with_stand_in_workers(window, budget_mb):
    names, sizes = model_units()
    if budget_mb == "min":  # the smallest budget: W slots of the largest unit, nothing resident
        budget_mb = window * 3
    budget = None if budget_mb is None else budget_mb * MB
    plan = plan_residency(names, sizes, budget, window)
    sched = StreamSchedule(plan)
    sim = StandIns(sched, random.Random(window * 100 + (budget_mb or 0)))
    await asyncio.wait_for(sim.run(passes=5), 30)
    # every pass ran every unit exactly once, in order
    assert sim.runs_per_pass == [list(range(len(names)))] * 5
    assert sim.max_slots_busy <= plan.num_slots and sim.max_loads <= plan.num_slots
    # resident units were never streamed
    assert not {u for _, u, _ in sim.loads} & set(plan.resident_offsets)
    if plan.streamed:
        assert len(sim.loads) >= 5 * len(plan.streamed)
        # prefetch crosses pass boundaries: every pass had its first streamed units loading
        # (min(W, streamed) of them) before it began, i.e. while the previous one sampled
        assert sim.loaded_before_begin == [plan.num_slots] * 5
    else:
        assert sim.loads == [] and plan.num_slots == 0


def test_prefetch_of_next_pass_starts_before_it_begins():
    names, sizes = model_units()
    plan = plan_residency(names, sizes, 6 * MB, 2)  # everything streamed through 2 slots
    sched = StreamSchedule(plan)
    loads, _ = sched.step()
    assert [ld.unit for ld in loads] == [0, 1]  # idle server: the first pass is prefetched
    sched.begin_pass()
    n = plan.num_units
    for u in range(n):
        sched.on_loaded(u, u % 2)
        loads, runs = sched.step()
        assert [r.unit for r in runs] == [u] and loads == []
        assert sched.loads_in_flight == 1  # the other slot: unit u+1, or the next pass's unit 0
        done = sched.on_done(u, u % 2)
        loads, _ = sched.step()
        nxt = (u + 2) % n
        assert [(ld.unit, ld.slot) for ld in loads] == [(nxt, u % 2)], f"slot refills with {nxt}"
        assert done == (u == n - 1)
    # the pass has ended (sampling now) and the next pass's first two units are already loading
    assert not sched.pass_running and sched.loads_in_flight == 2
    with pytest.raises(AssertionError):
        sched.on_done(0, 0)  # a Done without a Run is a protocol violation


def test_consecutive_resident_units_go_as_one_run():
    """Everything resident: one Run (count = all units) per pass, one Done ends it; with blocks
    streamed, each run of resident units between them is one Run."""
    names, sizes = model_units()
    sched = StreamSchedule(plan_residency(names, sizes, None, 2))
    sched.begin_pass()
    _, runs = sched.step()
    assert [(r.unit, r.slot, r.count) for r in runs] == [(0, RESIDENT, len(sizes))]
    assert sched.on_done(0, RESIDENT) and not sched.pass_running
    plan = plan_residency(names, sizes, sum(sizes) - 1, 1)  # the last blocks no longer fit
    sched = StreamSchedule(plan)
    sched.step()
    sched.begin_pass()
    _, runs = sched.step()
    first_streamed = plan.streamed[0]
    assert [(r.unit, r.count) for r in runs] == [(0, first_streamed)]
    assert set(range(first_streamed)) <= set(plan.resident_offsets)


def test_a_pass_queued_behind_the_running_one():
    """Everything resident: the scheduler's pass ahead goes out while the running pass's Run is
    not Done; each Done ends one pass, in order. Not with a streamed unit."""
    names, sizes = model_units()
    sched = StreamSchedule(plan_residency(names, sizes, None, 2))
    assert not sched.may_queue  # nothing running
    sched.begin_pass()
    sched.step()
    assert sched.may_queue
    runs = sched.queue_pass()
    assert [(r.unit, r.slot, r.count) for r in runs] == [(0, RESIDENT, len(sizes))]
    assert not sched.may_queue  # one pass ahead at most
    assert sched.on_done(0, RESIDENT) and sched.pass_running and sched.passes == 1
    assert sched.may_queue  # the queued pass runs now: the next may queue behind it
    assert sched.on_done(0, RESIDENT) and not sched.pass_running and sched.passes == 2
    streamed = StreamSchedule(plan_residency(names, sizes, sum(sizes) - 1, 1))
    streamed.begin_pass()
    streamed.step()
    assert not streamed.may_queue
