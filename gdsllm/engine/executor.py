"""Executors: what runs a PassPlan of the scheduler (gdsllm.engine.scheduler). They only run.

    plans = PlanRunner(runner, speculator)   # a plan on a Runner: the part every executor shares
    plans.begin(plan)                        # released state dropped, tables, samplers, drafts
    ... runner.run_unit(unit, weights) for every unit, in order ...
    result = plans.finish()                  # PassResult: sampled (and accepted) tokens
    plans.abort()                            # the pass failed midway

    ex = LocalExecutor(meta, runner, resident, prefetch, experts, plans)   # in-process (gdsllm.LLM)
    result = ex.execute(plan)

Two executors run plans: `LocalExecutor`, in this process (gdsllm.LLM and the CPU tests), and the
service's I/O and compute worker processes (gdsllm.service.compute_worker runs each StartPass
through a PlanRunner; its units arrive as their reads land). Both take a streamed unit's weights
from the same kind of prefetch window: W rotating slots read ahead in one endless cycle while the
device computes (gdsllm.engine.prefetch in-process, the I/O worker driven by
gdsllm.engine.planner.StreamSchedule in the service).
"""
from __future__ import annotations

import time

from gdsllm.engine.sampling import Sampler
from gdsllm.engine.scheduler import PassPlan, PassResult
from gdsllm.engine.speculative import pass_tokens
from gdsllm.models.views import unit_tensors


class PlanRunner:
    """A plan's bookkeeping around a Runner (gdsllm.engine.runner): the sequences released before
    it, the joining sequences' KV tables and seeded samplers, the draft's proposals, and the
    tokens at its end."""

    def __init__(self, runner, speculator=None):
        self.runner, self.speculator = runner, speculator
        self.samplers: dict[int, Sampler] = {}
        self.plan: PassPlan | None = None

    def begin(self, plan: PassPlan) -> None:
        """Start the pass of `plan` on the runner (ValueError for a plan it cannot run)."""
        self.release(plan.released)
        for sid, params in plan.new.items():  # seeded once: its draws do not depend on the batch
            self.samplers[sid] = Sampler(params)
        missing = [sid for sid in plan.seq_ids if sid not in self.samplers]
        if missing:
            raise ValueError(f"sequences {missing} have no sampling parameters")
        self.runner.assign(plan.tables)  # first: a draft's tree fits inside the blocks they give
        if self.speculator is not None:  # the draft holds the same sequences in the same blocks
            self.speculator.assign(plan.tables)
        chunks, rows, trees = plan.chunks, None, None
        try:
            if self.speculator is not None:  # a chain, or a tree of the request's draft_tree nodes
                chunks, rows = self.speculator.plan(chunks, plan.draft, self.samplers, {
                    sid: self.samplers[sid].params.draft_tree for sid in plan.draft})
                trees = self.speculator.trees or None
            elif plan.draft:
                raise ValueError("draft tokens asked of an executor without a draft")
            self.runner.start_pass(chunks, logit_rows=rows, trees=trees)
        except BaseException:
            if self.speculator is not None:
                self.speculator.abort(self.runner)
            raise
        self.plan = plan

    def finish(self) -> PassResult:
        """End the pass: its sequences' tokens (accepted drafts, then the sampled one)."""
        plan, self.plan = self.plan, None
        tokens, accepted, proposed, failed = pass_tokens(
            self.runner.end_pass(), plan.seq_ids, plan.partial, self.samplers, self.speculator, self.runner)
        draft_s = self.speculator.last_draft_seconds if self.speculator is not None else 0.0
        return PassResult({sid: [*accepted.get(sid, ()), t] for sid, t in tokens}, failed, proposed,
                          draft_seconds=draft_s)

    def abort(self) -> None:
        """The pass stopped midway: the caches keep only what earlier passes committed."""
        self.plan = None
        self.runner.abort_pass()
        if self.speculator is not None:
            self.speculator.abort(self.runner)

    def release(self, seq_ids) -> None:
        for sid in seq_ids:
            self.runner.release(sid)
            if self.speculator is not None:
                self.speculator.release(sid)
            self.samplers.pop(sid, None)


class LocalExecutor:
    """Plans run in this process: resident units from their arena views, streamed ones from the
    prefetch window, a mixture of experts' routed experts through the expert cache."""

    def __init__(self, meta, runner, resident: dict[int, dict], prefetch=None, experts=None,
                 plans: PlanRunner | None = None):
        self.meta, self.runner, self.resident = meta, runner, resident
        self.prefetch, self.experts = prefetch, experts
        self.plans = plans or PlanRunner(runner)

    def execute(self, plan: PassPlan) -> PassResult:
        t0 = time.perf_counter()
        self.plans.begin(plan)
        try:
            self.run_units()
        except BaseException:
            self.plans.abort()
            self.realign()
            raise
        result = self.plans.finish()
        result.seconds = time.perf_counter() - t0
        return result

    def run_units(self) -> None:
        """Every unit of the started pass, in order (raises what a unit raised)."""
        for unit in self.meta.units:
            if unit.kind == "expert":  # read only when routed, through the expert cache
                continue
            weights = self.resident.get(unit.index)
            if weights is not None:
                self.runner.run_unit(unit, weights)
            else:  # streamed: read ahead by the prefetch window, its slot freed once run
                self.runner.run_unit(unit, unit_tensors(unit, self.prefetch.take(unit)))
                self.prefetch.release()
            if self.experts is not None and unit.kind == "block":
                self.experts.run_layer(self.runner, unit.layer)

    def realign(self) -> None:
        """After a pass that stopped midway: the window starts over at the next pass's first unit."""
        if self.prefetch is not None:
            self.prefetch.realign()
