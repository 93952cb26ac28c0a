"""Mixtures of experts through the service: the block units run, the compute worker reports the
routed union (`Routed`), the coordinator reads the missing experts into arena slots and has them
run (`RunExperts`). Tiny random Mixtral / Qwen3-MoE give transformers' greedy tokens; the expert
counters match transformers' router choices; prefetch guesses never change the tokens.
"""
from __future__ import annotations

import msgpack
import pytest

from llama_ref import greedy_reference_scores, load
from moe_ref import moe_model, pass_unions, router_picks
from service_helpers import Service, single_thread_workers  # noqa: F401  (fixture)
from gdsllm.engine.tokenizer import Tokenizer
from ipc.messages import RESIDENT, ExpertsDone, ProtocolError, Routed, Run, RunExperts, decode, encode

N = 32
PROMPT = "the quick brown fox jumps"


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe_norm"])
def moe(request, tmp_path_factory):
    case = request.param
    hf, _, d = moe_model(tmp_path_factory.mktemp(case), case)
    ids = Tokenizer(load(d)).encode(PROMPT)
    ref, _ = greedy_reference_scores(hf, ids, N)
    passes = [list(range(len(ids)))] + [[len(ids) + t] for t in range(N - 1)]
    unions = pass_unions(router_picks(hf, ids + ref[:N - 1]), passes)
    return case, d, ref, unions


def _generate(d, **cfg):
    from gdsllm.service.client import Client
    with Service(d, **cfg) as s, Client(s.endpoint, timeout=120) as c:
        f = c.generate(PROMPT, max_tokens=N, temperature=0, ignore_eos=True)
        ex = s.svc.coordinator.batch.experts
        metrics = s.svc.coordinator.metrics.exposition().decode()
        return f.token_ids, dict(ex.totals), (ex.slots.count, len(s.svc.coordinator.plan.streamed)), metrics


def test_service_reads_only_routed_experts(moe, single_thread_workers):  # noqa: F811
    """No budget, no prefetch: each routed expert is read once, the first time it is routed."""
    case, d, ref, unions = moe
    toks, t, slots, metrics = _generate(d, expert_prefetch=False)
    assert toks == ref, case
    distinct = {(layer, e) for u in unions for layer, es in enumerate(u) for e in es}
    assert slots[0] == len(load(d).units) - 2 - load(d).params.num_hidden_layers  # one per expert
    assert t["routed"] == sum(len(es) for u in unions for es in u)
    assert t["loads"] == len(distinct) and t["prefetch_loads"] == 0
    assert t["hits"] == t["routed"] - t["loads"]
    assert t["lent"] == t["hits"]  # every hit ran from its block's Run: no RunExperts round trip
    assert f"gdsllm_expert_loads_total{{reason=\"demand\"}} {float(len(distinct))}" in metrics


def test_service_small_budget_with_prefetch(moe, single_thread_workers):  # noqa: F811
    """Every block streamed through 2 slots, top-k expert slots, prefetch on: same tokens; every
    routed expert was a hit or a demand read; guesses are accounted as hits or misses."""
    case, d, ref, unions = moe
    meta = load(d)
    slot = max(u.nbytes for u in meta.units if u.kind == "expert")
    dense = sorted((u.nbytes for u in meta.units if u.kind != "expert"), reverse=True)
    k = meta.params.num_experts_per_tok
    budget = dense[0] + dense[1] + 2 * dense[2] + k * slot  # embed, head resident; 2 block slots
    toks, t, slots, metrics = _generate(d, vram_budget=budget, prefetch_window=2)
    assert toks == ref, case
    assert slots == (k, meta.params.num_hidden_layers)  # k expert slots, every block streamed
    assert t["routed"] == sum(len(es) for u in unions for es in u)
    assert t["hits"] + t["loads"] == t["routed"] and t["loads"] > 0
    assert t["prefetch_hits"] + t["prefetch_misses"] <= t["prefetch_loads"]
    assert t["prefetch_loads"] > 0  # the guesses were made and read
    assert t["bytes_read"] == (t["loads"] + t["prefetch_loads"]) * slot
    for name in ("gdsllm_expert_cache_hits_total", "gdsllm_expert_prefetch_hits_total",
                 "gdsllm_expert_prefetch_misses_total", "gdsllm_expert_read_bytes_total"):
        assert name in metrics


def test_killed_compute_worker_mid_moe_pass(moe, single_thread_workers):  # noqa: F811
    """SIGKILL the compute worker while a MoE generation streams (experts lent, loads and guesses
    in flight): the request fails with worker_died, the expert cache starts afresh with the new
    workers, and the next request gives transformers' tokens again."""
    import os
    import signal
    import time

    from gdsllm.service.client import Client, ServiceError
    case, d, ref, _ = moe
    meta = load(d)
    slot = max(u.nbytes for u in meta.units if u.kind == "expert")
    dense = sum(u.nbytes for u in meta.units if u.kind != "expert")
    with Service(d, vram_budget=dense + 4 * slot) as s, Client(s.endpoint, timeout=60) as c:
        co = s.svc.coordinator
        stream = c.stream_messages(PROMPT, max_tokens=150, temperature=0, ignore_eos=True)
        next(stream)  # mid-generation
        os.kill(co.workers.pids["compute"], signal.SIGKILL)
        with pytest.raises(ServiceError) as err:
            for _ in stream:
                pass
        assert err.value.code == "worker_died", case
        deadline = time.monotonic() + 30
        while c.health().status != "ok":
            assert time.monotonic() < deadline, c.health()
            time.sleep(0.1)
        f = c.generate(PROMPT, max_tokens=N, temperature=0, ignore_eos=True)
        assert f.token_ids == ref, case
        ex = co.batch.experts
        assert ex.workers is co.workers and not ex.busy and ex.cur is None and ex.lent == {}


def test_expert_messages_are_validated():
    for bad in (lambda: Routed(1, 2, [3, 3]), lambda: Routed(1, 2, [-1]),
                lambda: RunExperts(1, 2, []), lambda: RunExperts(1, 2, [(5, -4096)])):
        with pytest.raises(ValueError):
            bad()
    m = RunExperts(4, 7, [(8, 4096), (9, 8192)])
    assert decode(encode(m), max_bytes=None) == m
    run = Run(3, RESIDENT, 0, 1, experts=[(8, 4096), (9, 8192)])  # a MoE block lending experts
    assert decode(encode(run), max_bytes=None) == run
    for bad in ([[8, True]], [[8, 4096, 1]], [[8, "x"]], [[8, -1]], [[8, 0], [8, 4096]]):
        raw = msgpack.packb({"type": "run", "unit": 3, "slot": RESIDENT, "offset": 0, "experts": bad})
        with pytest.raises(ProtocolError):  # each pair checked, also on the fast path
            decode(raw, max_bytes=None)
    assert decode(encode(ExpertsDone(4, 7, [8, 9], 0.5)), max_bytes=None).experts == [8, 9]


# ---- the coordinator's logic alone (no processes) -----------------------------------------------

def test_stream_schedule_holds_runs_until_the_experts_ran(tmp_path):
    from gdsllm.convert.synth import synth
    from gdsllm.engine.experts import plan_moe
    from gdsllm.engine.planner import StreamSchedule
    meta = load(synth(tmp_path / "m", "tiny-moe", dtype="float32"))
    plan, _ = plan_moe(meta, None)
    sched = StreamSchedule(plan)
    sched.begin_pass()
    _, runs = sched.step()
    names = [(meta.units[r.unit].name, r.count) for r in runs]
    assert names == [("embed", 2)] and sched.held == 1  # one resident Run, no expert unit is Run
    for r in runs:
        sched.on_done(r.unit, r.slot)
    assert sched.step()[1] == []  # held: block.1 waits for block.0's experts
    sched.release(1)
    _, runs = sched.step()
    assert [meta.units[r.unit].name for r in runs] == ["block.1"]
    sched.on_done(runs[0].unit, runs[0].slot)
    sched.ungate()  # a failed pass: nothing waits for experts any more
    _, runs = sched.step()
    assert [meta.units[r.unit].name for r in runs] == ["head"]
    assert sched.on_done(runs[0].unit, runs[0].slot)  # the pass is complete


def test_expert_scheduler_lru_prefetch_and_errors(tmp_path):
    from gdsllm.convert.synth import synth
    from gdsllm.engine.experts import ExpertSlots
    from gdsllm.service.experts import ExpertScheduler
    from ipc.messages import Loaded
    meta = load(synth(tmp_path / "m", "tiny-moe", dtype="float32"))
    b0, b1 = (next(u.index for u in meta.units if u.name == f"block.{i}") for i in (0, 1))
    size = max(u.nbytes for u in meta.units if u.kind == "expert")
    ex = ExpertScheduler(meta, ExpertSlots(1 << 20, size, 2))

    def loaded(ld, error=None):
        return ex.on_loaded(Loaded(ld.unit, ld.slot, 0 if error else size, 0.01, "posix", error))

    loads, runs, release = ex.on_routed(Routed(1, b0, [3, 5], predicted=[6]))
    assert runs == [] and release is None
    assert [meta.units[ld.unit].name for ld in loads] == ["block.0.expert.3", "block.0.expert.5"]
    assert {ld.offset for ld in loads} == {1 << 20, (1 << 20) + size}  # both slots, no guess yet
    more, runs, release = loaded(loads[0])
    assert more == [] and [u for u, _ in runs[0].experts] == [loads[0].unit] and release is None
    more, runs2, release = loaded(loads[1])
    assert more == [] and len(runs2) == 1
    assert release == b0  # every routed expert is sent to run: the pass's next Runs may follow
    more, _, release = ex.on_done(ExpertsDone(1, b0, [loads[0].unit], 0.1))
    assert release is None and [meta.units[ld.unit].name for ld in more] == ["block.1.expert.6"]
    more2, _, _ = ex.on_done(ExpertsDone(1, b0, [loads[1].unit], 0.1))
    assert more2 == [] and ex.cur is None  # the guess is in flight; block.0 is done
    loaded(more[0])  # the guessed expert is in
    lent = ex.lend(b1)  # block.1's Run lends it: the worker runs it if routed, no round trip
    assert lent == [(more[0].unit, more[0].offset)]
    loads, runs, release = ex.on_routed(Routed(1, b1, [6, 1]))
    assert runs == [] and release is None  # 6 ran in the worker; 1 is read
    assert [meta.units[ld.unit].name for ld in loads] == ["block.1.expert.1"]
    assert loads[0].offset != more[0].offset  # never into the slot the worker is reading
    t = ex.totals
    assert (t["prefetch_hits"], t["prefetch_misses"], t["hits"], t["loads"], t["prefetch_loads"]) == \
        (1, 0, 1, 3, 1)
    _, runs, release = loaded(loads[0], error="unit block.1.expert.1: OSError: EIO")
    assert len(runs) == 1 and release == b1  # a failed read still runs (its pass fails) ...
    ex.on_done(ExpertsDone(1, b1, [more[0].unit], 0.1))  # the lent one the worker ran
    ex.on_done(ExpertsDone(1, b1, [loads[0].unit], 0.1))
    assert (1, 1) not in ex.cached and ex.cur is None  # ... and then leaves the cache
    assert ex.lend(b1) == lent and ex.busy  # lent again ...
    ex.abort()  # ... and its pass failed: nothing will run it, the slot is free again
    assert not ex.busy and ex.lent == {}


def test_expert_books_shared_by_llm_and_the_service(tmp_path):
    """One set of expert books (gdsllm.engine.expert_books) under LLM's cache and the service's
    scheduler: a slot in use or an expert wanted now is never the victim; evictions are counted."""
    from gdsllm.convert.synth import synth
    from gdsllm.engine.expert_books import ExpertBooks
    from gdsllm.engine.experts import ExpertCache, ExpertSlots
    from gdsllm.service.experts import ExpertScheduler
    meta = load(synth(tmp_path / "m", "tiny-moe", dtype="float32"))
    slots = ExpertSlots(4096, 1024, 2)
    assert type(ExpertScheduler(meta, slots).books) is type(ExpertCache(meta, None, slots, None).books)
    books = ExpertBooks(meta, slots)
    assert [books.take_slot((), 0) for _ in range(2)] == [(0, None), (1, None)]
    books.insert((0, 1), 0)
    books.insert((1, 2), 1)
    assert books.offset(1) == 4096 + 1024 and books.slot_of(books.unit_of[(1, 2)]) == 1
    books.hold(0)  # (0, 1) is being run
    assert books.take_slot({(1, 2)}, 1) == (None, None)  # the other one is wanted now
    assert books.take_slot((), 1) == (1, (1, 2)) and books.totals["evictions"] == 1
    books.unhold(0)
    assert books.take_slot((), 1) == (0, (0, 1))  # released: it may go now
    books.drop((0, 1))  # no longer cached: nothing to free
    assert books.free == [] and len(books.cached) == 0
