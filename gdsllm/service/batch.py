"""The service's side of the engine loop: requests in, the scheduler's plans out to the worker
processes, their results back to the scheduler and to the clients.

    batch = Batch(meta, plan, workers, reply, metrics, config, admission, fault, experts=None)
    batch.add(seq)                          # a gdsllm.service.requests.Sequence
    batch.on_io(msg) / batch.on_compute(msg)    # Loaded / Done / PassResult / Routed / ... / WorkerError
    batch.cancel(seq); batch.fail_all(code, why)
    batch.abort_running(code, why); batch.attach(new_workers)   # the workers were replaced

What to run is decided by the engine's scheduler (gdsllm.engine.scheduler), the one gdsllm.LLM
uses: admission by KV blocks and max_batch, the KV books (block ids go out in the plan),
chunked prefill, draft lengths, the stop rules. This module is its executor across processes: a
plan goes to the compute worker as one StartPass, which also carries the pass's first Runs (for a
resident model, the whole pass: one message out, Done and PassResult back); streamed units
follow as their reads land, driven by the planner's StreamSchedule (gdsllm.engine.planner), whose
next pass's loads start as soon as a slot frees, before this pass's tokens are back. When
everything is resident (no streamed unit, no mixture of experts, no draft; ServiceConfig's
schedule_ahead), a pass of plain decoding is followed at once by the scheduler's pass ahead
(Scheduler.schedule_ahead): its StartPass (`follows`, every Run inline) waits in the compute
worker's socket and begins the moment the pass before it ends, with the tokens that pass
sampled; each PassResult then schedules the next pass ahead of the one now running. The
device does not wait for the messages and the scheduler between passes. For a
mixture of experts, a block's Run lends the layer's resident experts and the routed ones that are
missing are read and run (gdsllm.service.experts.ExpertScheduler), after which the pass goes on.
`reply(client, msg) -> bool` sends to a client; False means the client is gone, and its requests
are cancelled.

No error leaves a pass hanging: a compute WorkerError about the pass fails its sequences; a unit
that could not be loaded (read error, checksum) fails the sequences of the pass that needed it,
naming the file, when that pass ends; anything that cannot be attributed (a fatal or unattributed
WorkerError, a reply out of order) is `fault(detail, code)`: the coordinator replaces the workers.
`last_progress` is the time of the last worker reply, for the coordinator's watchdog.
"""
from __future__ import annotations

import dataclasses
import logging
import time

from ipc.messages import (Done, Error, ExpertsDone, Load, Loaded, PassResult, Routed, Run,
                          SeqSampling, StartPass, TokenChunk, WorkerError, encode)

from gdsllm.engine import planner
from gdsllm.engine import scheduler as engine
from gdsllm.engine.blocks import BlockBooks
from gdsllm.models.kv_cache import kv_bytes_per_token
from gdsllm.service.admission import caller_key, kv_itemsize
from gdsllm.service.pass_trace import PassTrace
from gdsllm.service.requests import Sequence

log = logging.getLogger("gdsllm.service.batch")


def books_of(workers) -> BlockBooks:
    """The books of the KV cache the compute worker made (its RunnerReady)."""
    o = workers.opened
    return BlockBooks(o.kv_tokens // o.kv_block_size + 1, o.kv_block_size)


class Batch:
    def __init__(self, meta, plan: planner.ResidencyPlan, workers, reply, metrics, config, admission,
                 fault, experts=None):
        self.experts = experts  # a mixture of experts: gdsllm.service.experts.ExpertScheduler
        self.plan, self.reply, self.metrics, self.admission, self.fault = plan, reply, metrics, admission, fault
        self.core = engine.Scheduler(books_of(workers), max_batch=config.max_batch,
                                     max_pass_tokens=config.max_pass_tokens,
                                     draft_tokens=config.draft_tokens if config.draft is not None else 0,
                                     draft_tree=config.draft_tree if config.draft is not None else None,
                                     ahead=(config.schedule_ahead and config.draft is None
                                            and experts is None and not plan.streamed))
        self.kv_token_bytes = kv_bytes_per_token(meta.params, kv_itemsize(meta, config))
        self.by_key: dict[tuple[bytes, str], Sequence] = {}
        self.passes_completed = 0
        self.passes_ahead = 0  # passes sent ahead (Scheduler.schedule_ahead)
        self.largest_pass_bytes = 0  # the largest StartPass sent (bytes)
        self.healthy = True
        self.failure = ""  # why the service stopped serving, after fail_all
        self.trace = PassTrace("coordinator")  # GDSLLM_PASS_TRACE
        self.attach(workers)

    def attach(self, workers) -> None:
        """Serve on `workers` (fresh ones after a restart): a new stream schedule, no pass running,
        the books of their KV cache."""
        self.workers = workers
        self.sched = planner.StreamSchedule(self.plan)
        self.pass_base = self.core.pass_id  # pass_id of the schedule's pass k is pass_base + k + 1
        self.poisoned: dict[int, str] = {}  # pass_id -> why its sequences fail at its result
        self.paused = workers is None
        self.stall_since: float | None = None
        self.last_progress = time.monotonic()
        if workers is not None and self.core.books.capacity_tokens != workers.opened.kv_tokens:
            self.core.reset(books_of(workers))

    # ------------------------------------------------------------------ what the coordinator reads

    @property
    def pass_id(self) -> int:
        return self.core.pass_id

    @property
    def result_pending(self) -> bool:
        """A PassResult is awaited (the scheduler's pass in flight)."""
        return self.core.in_flight is not None

    @property
    def in_pass(self) -> bool:
        return self.result_pending or self.sched.pass_running

    @property
    def running(self) -> dict[int, Sequence]:
        return self.core.running

    @property
    def waiting(self):
        return self.core.waiting

    def queued(self, coming: int = 0) -> int:
        """Requests that will wait behind a full batch: those waiting and `coming` (being
        tokenized) beyond the places the batch has free. What --max-waiting bounds: a request
        that joins the waiting list only until the next pass schedules it into a free place
        does not queue (two requests at once to an idle `--max-batch 1 --max-waiting 1`
        service both go in)."""
        free = max(0, self.core.max_batch - len(self.core.running))
        return max(0, len(self.core.waiting) + coming - free)

    def kv_bytes(self) -> tuple[int, int]:
        """(the KV cache's bytes, the bytes its admitted sequences hold)."""
        b = self.core.books
        return b.capacity_tokens * self.kv_token_bytes, b.used_blocks * b.block_size * self.kv_token_bytes

    def never_fits(self, seq: Sequence) -> str | None:
        why = self.core.never_fits(seq)
        return why and f"request {seq.request.request_id}: {why} (the cache's size: --kv-budget)"

    # ------------------------------------------------------------------ requests

    def add(self, seq: Sequence) -> None:
        assert seq.key not in self.by_key, seq.key
        self.by_key[seq.key] = seq
        self.admission.enter(caller_key(seq.client, seq.request.caller))
        self.core.add(seq)
        self.metrics.add_prompt_tokens(len(seq.prompt_ids))
        self.maybe_start_pass()
        self._gauges()

    def cancel(self, seq: Sequence) -> None:
        if self.core.cancel(seq.seq_id):
            self.finish(seq, "cancelled")
        # else: its KV cache is in use by the pass in flight: it leaves at that pass's result

    def cancel_client(self, client: bytes) -> None:
        for seq in [s for s in self.by_key.values() if s.client == client]:
            self.cancel(seq)

    def finish(self, seq: Sequence, reason: str | None = None) -> None:
        """Send the Final, forget the request and free its KV cache."""
        if not self._forget(seq):
            return
        final = seq.final(reason)
        self.metrics.observe_request(final.duration_s, final.finish_reason)
        self.reply(seq.client, final)

    def fail(self, seq: Sequence, code: str, message: str) -> None:
        if not self._forget(seq):
            return
        self.metrics.observe_request(time.perf_counter() - seq.arrived, "error")
        self.reply(seq.client, Error(seq.request.request_id, code, message))

    def fail_all(self, code: str, why: str) -> None:
        """Fail every request in flight (the service stops for good); no pass starts again."""
        if self.healthy:
            self.healthy, self.failure = False, why
        for seq in list(self.by_key.values()):
            self.fail(seq, code, f"request {seq.request.request_id} failed: {why}")

    def abort_running(self, code: str, why: str) -> None:
        """The workers are gone (their KV caches with them): fail the running requests now, keep
        the waiting ones for the workers that replace them (attach)."""
        self.paused = True
        for seq in self.core.reset(BlockBooks(self.core.books.num_blocks, self.core.books.block_size)):
            self.fail(seq, code, f"request {seq.request.request_id} failed: {why}")

    def _forget(self, seq: Sequence) -> bool:
        if self.by_key.pop(seq.key, None) is None:
            return False  # already finished (e.g. cancelled, then its client vanished)
        self.admission.leave(caller_key(seq.client, seq.request.caller))
        self.core.remove(seq.seq_id)  # released to the worker in the next StartPass
        self._gauges()
        return True

    def _gauges(self) -> None:
        self.metrics.set_requests(len(self.core.running), len(self.core.waiting))

    # ------------------------------------------------------------------ passes

    def maybe_start_pass(self) -> None:
        """Send the next pass when none is in flight, then the pass ahead of it when the
        scheduler plans one (and the stream schedule can queue it: everything resident)."""
        if not self.healthy or self.paused:
            return
        sent = False
        if not self.result_pending and not self.sched.pass_running:
            plan = self.core.schedule()
            if plan is None:
                return
            self.sched.begin_pass()
            loads, runs = self._step()
            inline = [] if any(r.experts for r in runs) else runs  # a run lending experts goes alone
            self._send_plan(plan, inline)
            self._send(loads, [] if inline else runs)
            sent = True
        if self.sched.may_queue and (plan := self.core.schedule_ahead()) is not None:
            self._send_plan(plan, self.sched.queue_pass())
            self.passes_ahead += 1
            sent = True
        if sent:
            self.last_progress = time.monotonic()
            self._gauges()

    def _send_plan(self, plan: engine.PassPlan, runs) -> None:
        sampling = {sid: SeqSampling(p.temperature, p.top_p, p.top_k, p.seed, p.draft_tree)
                    for sid, p in plan.new.items()}
        raw = encode(StartPass(plan.pass_id, plan.chunks, sampling, sorted(plan.partial), plan.draft,
                               plan.tables, list(plan.released),
                               [(r.unit, r.slot, r.offset, r.count) for r in runs], plan.follows))
        self.largest_pass_bytes = max(self.largest_pass_bytes, len(raw))
        t = time.monotonic()
        self.workers.compute.send(raw)
        self.trace("plan_sent", plan.pass_id, t, ahead=plan.follows is not None)

    def pump(self) -> None:
        """Send every Load and Run the schedule allows now."""
        if not self.paused:
            self._send(*self._step())

    def _step(self) -> tuple[list[Load], list[Run]]:
        """The schedule's Loads and Runs as messages (a MoE block's Run lends the layer's resident
        experts); accounts compute stalls."""
        loads, runs = self.sched.step()
        loads = [Load(ld.unit, ld.slot, ld.offset) for ld in loads]
        runs = [Run(r.unit, r.slot, r.offset, r.count) for r in runs]
        ex = self.experts
        if ex is not None and not self.sched.ungated:  # a failed pass runs no experts
            ex.bind(self.workers)
            runs = [dataclasses.replace(r, experts=ex.lend(last)) if (last := r.unit + r.count - 1)
                    in self.sched.gates else r for r in runs]
        now = time.perf_counter()
        if self.sched.waiting_on_storage:
            self.stall_since = self.stall_since or now
        elif self.stall_since is not None:
            self.metrics.add_stall(now - self.stall_since)
            self.stall_since = None
        self.metrics.set_slots_in_flight(self.sched.slots_in_flight)
        return loads, runs

    def _send(self, loads, runs) -> None:
        for ld in loads:
            self.workers.io.send(encode(ld))
        for r in runs:
            self.workers.compute.send(encode(r))

    # ------------------------------------------------------------------ worker replies

    def on_io(self, msg) -> None:
        self.last_progress = time.monotonic()
        if isinstance(msg, Loaded) and self.experts is not None and msg.unit in self.experts.key_of:
            return self._expert_loaded(msg)
        if isinstance(msg, Loaded):
            if msg.error:
                self._poison(msg)
            else:
                self.metrics.observe_load(msg.nbytes, msg.seconds, msg.io_path)
            self.sched.on_loaded(msg.unit, msg.slot)  # its Run still goes out: the slot moves on
            self.pump()
        elif isinstance(msg, WorkerError):
            log.error("io worker: %s", msg.message)
            self.fault(f"io worker: {msg.message}", "internal")  # a Load may be lost: start afresh

    def _poison(self, msg: Loaded) -> None:
        seq = self.sched.slot_seq[msg.slot] if 0 <= msg.slot < self.sched.w else None
        if seq is None:
            return self.fault(f"io worker: {msg.error}", "io_error")
        pass_id = self.pass_base + seq // self.sched.m + 1
        log.error("pass %d: %s", pass_id, msg.error)
        self.poisoned.setdefault(pass_id, msg.error)

    def on_compute(self, msg) -> None:
        self.last_progress = time.monotonic()
        if isinstance(msg, (Routed, ExpertsDone)):
            return self._expert_reply(msg)
        if isinstance(msg, Done):
            self.metrics.observe_compute(msg.seconds, msg.count)
            if self.sched.on_done(msg.unit, msg.slot):
                self.passes_completed += 1
            self.pump()
        elif isinstance(msg, PassResult):
            self.trace("result_received", msg.pass_id)
            expected = self.core.in_flight.pass_id if self.result_pending else None
            if msg.pass_id != expected:
                return self.fault(f"compute worker sent the result of pass {msg.pass_id} while "
                                  f"{f'pass {expected}' if expected else 'none'} was expected", "internal")
            self._pass_result(msg)
        elif isinstance(msg, WorkerError):
            log.error("compute worker: %s", msg.message)
            if msg.fatal or msg.pass_id is None:
                return self.fault(f"compute worker: {msg.message}", "internal")
            if self.experts is not None and msg.pass_id == self.pass_id:
                # its MoE blocks send no Routed any more: nothing waits for experts (their Runs
                # come back Done without computing)
                self.experts.bind(self.workers)
                self.experts.abort()
                self.sched.ungate()
                self.pump()
            if self.result_pending and msg.pass_id == self.core.in_flight.pass_id:
                # The pass is dropped (its remaining Runs come back Done without computing):
                # its sequences' caches are undefined, so they fail (a pass ahead of it fails
                # at the worker too: its WorkerError follows).
                why = self.poisoned.pop(msg.pass_id, None)  # garbage weights may well fail it
                code, text = ("io_error", f"pass {msg.pass_id}: {why}") if why else ("internal", msg.message)
                for seq in self.core.fail_pass():
                    self.fail(seq, code, text)
        if not self.sched.pass_running:
            self.maybe_start_pass()

    def _pass_result(self, msg: PassResult) -> None:
        why = self.poisoned.pop(msg.pass_id, None)
        if why is not None:  # a unit of this pass did not load: its output is garbage
            for seq in self.core.fail_pass():
                self.fail(seq, "io_error", f"pass {msg.pass_id}: {why}")
            return
        running = self.core.running  # a sequence failed meanwhile (fail_all) has left it
        prev = {sid: running[sid].last_token_at for sid in self.core.in_flight.seq_ids if sid in running}
        m = self.metrics
        steps = self.core.update(engine.PassResult(msg.tokens, msg.failed, msg.proposed, msg.seconds))
        if msg.draft_seconds:
            m.observe_draft_seconds(msg.draft_seconds)
        # The scheduler's books are final: the next pass goes out now (or, with a pass ahead
        # running, the one after it), and the device computes while this one's tokens are
        # streamed to the clients and counted.
        self.maybe_start_pass()
        for step in steps:
            seq = step.gen
            if step.error is not None:  # its logits could not be sampled: it alone fails
                self.fail(seq, "internal", f"request {seq.request.request_id}: {step.error}")
                continue
            if seq.cancelled:
                self.finish(seq, "cancelled")
                continue
            m.add_generation_tokens(len(step.ids))
            if step.proposed is not None:
                m.observe_speculation(step.proposed, len(msg.tokens[seq.seq_id]) - 1)
            if prev[seq.seq_id] is None:
                m.observe_ttft(seq.first_token_at - seq.arrived)
            else:
                for _ in step.ids:  # tokens of one pass share its latency
                    m.observe_itl((seq.last_token_at - prev[seq.seq_id]) / len(step.ids))
            if seq.request.stream and (step.delta or not step.finished):
                if not self.reply(seq.client, TokenChunk(seq.request.request_id, step.delta, step.ids)):
                    continue  # the client is gone: its requests were cancelled
            if step.finished:
                self.finish(seq)

    # ------------------------------------------------------------------ a mixture of experts

    def _expert_loaded(self, msg: Loaded) -> None:
        """An expert unit's Loaded: its RunExperts follows."""
        self.experts.bind(self.workers)
        if msg.error:  # its pass fails at its result; the expert leaves the cache once it has run
            log.error("pass %d: %s", self.pass_id, msg.error)
            self.poisoned.setdefault(self.pass_id, msg.error)
        else:
            self.metrics.observe_load(msg.nbytes, msg.seconds, msg.io_path)
        self._expert_send(*self.experts.on_loaded(msg))
        self.metrics.set_experts(self.experts.totals)

    def _expert_reply(self, msg) -> None:
        """Routed / ExpertsDone from the compute worker."""
        ex = self.experts
        if ex is None:
            return self.fault(f"compute worker sent {type(msg).__name__} for a dense model", "internal")
        ex.bind(self.workers)
        if self.sched.ungated or msg.pass_id != self.pass_id:
            if isinstance(msg, ExpertsDone):
                ex.on_done(msg)  # a failed pass's late reply: frees its slots
            return
        try:
            if isinstance(msg, Routed):
                loads, runs, block = ex.on_routed(msg)
            else:
                self.metrics.observe_compute(msg.seconds)
                loads, runs, block = ex.on_done(msg)
        except ValueError as e:
            return self.fault(f"compute worker: {e}", "internal")
        self._expert_send(loads, runs, block)
        self.metrics.set_experts(ex.totals)

    def _expert_send(self, loads, runs, release: int | None) -> None:
        """Send the loads and runs; `release`: every routed expert of that block is sent to run, so
        the pass's next Runs may follow them (the worker takes messages in order)."""
        if self.paused:
            return
        self._send(loads, runs)
        if release is not None and self.sched.held == release:
            self.sched.release(release)
            self.pump()
