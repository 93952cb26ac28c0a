"""The batch scheduler's mixture-of-experts hooks (gdsllm.service.scheduler calls them): expert
Loads and Routed / ExpertsDone replies go to its gdsllm.service.experts.ExpertScheduler, and the
loads, expert runs and pass releases that follow are sent.

    runs = lend_experts(sched, runs)   # a MoE block's Run lends the layer's resident experts
    expert_loaded(sched, msg)          # an expert unit's Loaded -> True (handled)
    expert_reply(sched, msg)           # Routed / ExpertsDone -> True (handled)
    expert_pass_failed(sched, msg)     # a compute WorkerError about the running pass
"""
from __future__ import annotations

import logging
from dataclasses import replace

from ipc.messages import ExpertsDone, Load, Loaded, Routed, RunExperts, encode

log = logging.getLogger("gdsllm.service.experts")


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


def lend_experts(sched, runs: list) -> list:
    """`runs` (from the stream schedule), the one that ends at a MoE block lending that layer's
    resident experts (the pass must be gated: a failed pass runs no experts)."""
    ex = sched.experts
    if ex is None or sched.sched.ungated:
        return runs
    ex.bind(sched.workers)
    return [replace(r, experts=ex.lend(last)) if (last := r.unit + r.count - 1) in sched.sched.gates
            else r for r in runs]


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
            loads, runs, block = ex.on_routed(msg)
        else:
            sched.metrics.observe_compute(msg.seconds)
            loads, runs, block = ex.on_done(msg)
    except ValueError as e:
        sched.fault(f"compute worker: {e}", "internal")
        return True
    _send(sched, loads, runs, block)
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


def _send(sched, loads: list[Load], runs: list[RunExperts], release: int | None) -> None:
    """Send the loads and runs; `release`: every routed expert of that block is sent to run, so
    the pass's next Runs may follow them (the worker takes messages in order)."""
    if sched.paused:
        return
    for ld in loads:
        sched.workers.io.send(encode(ld))
    for r in runs:
        sched.workers.compute.send(encode(r))
    if release is not None and sched.sched.held == release:
        sched.sched.release(release)
        sched.pump()
