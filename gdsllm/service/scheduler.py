"""Continuous batching: the request queue, the weight passes, and the worker replies that drive them.

    sched = BatchScheduler(plan, workers, reply, metrics, config, admission, fault)
    sched.add(seq)                         # joins at a next weight pass, once its KV cache fits
    sched.on_io(msg) / sched.on_compute(msg)   # Loaded / Done / PassResult / WorkerError
    sched.cancel(seq); sched.fail_all(code, why)
    sched.abort_running(code, why); sched.attach(new_workers)   # the workers were replaced

A pass serves every running sequence at once: decoding ones bring their last token, new ones a
chunk of their prompt. At most `max_pass_tokens` new tokens go into one pass (chunked prefill:
decoding sequences first, then prompts in arrival order), so one huge prompt does not stall every
other sequence for its whole prefill; no token is sampled for a chunk that does not end its prompt.
A waiting request joins when the batch has room (max_batch) and its KV cache fits the budget
(gdsllm.service.admission); finished ones leave after the pass that finished them (their KV caches
are Released). The next pass starts once the previous one's tokens are back; its first streamed
units are already loading (gdsllm.engine.planner). `reply(client, msg) -> bool` sends to a
client; False means the client is gone, and its requests are cancelled.

No error leaves a pass hanging: a compute WorkerError about the pass fails its sequences; a unit
that could not be loaded (read error, checksum) fails the sequences of the pass that needed it,
naming the file, when that pass ends; anything that cannot be attributed (a fatal or unattributed
WorkerError, a reply out of order) is `fault(detail, code)`: the coordinator replaces the workers.
`last_progress` is the time of the last worker reply, for the coordinator's watchdog.
"""
from __future__ import annotations

import logging
import time
from collections import deque

from ipc.messages import Done, Error, Loaded, PassResult, Release, StartPass, TokenChunk, WorkerError, encode

from gdsllm.engine.planner import ResidencyPlan, StreamSchedule
from gdsllm.engine.sequence import Sequence
from gdsllm.engine.speculative import draft_count
from gdsllm.service.admission import caller_key
from gdsllm.service.expert_hooks import expert_loaded, expert_pass_failed, expert_reply, lend_experts

log = logging.getLogger("gdsllm.service.scheduler")


class BatchScheduler:
    def __init__(self, plan: ResidencyPlan, workers, reply, metrics, config, admission, fault, experts=None):
        self.experts = experts  # a mixture of experts: gdsllm.service.experts.ExpertScheduler
        self.plan, self.reply, self.metrics, self.admission, self.fault = plan, reply, metrics, admission, fault
        self.max_batch, self.max_pass_tokens = config.max_batch, config.max_pass_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # seq_id -> sequence with a KV cache
        self.by_key: dict[tuple[bytes, str], Sequence] = {}
        self.prefill: dict[int, int] = {}  # seq_id -> prompt tokens sent, while the prompt is not all in
        self.pass_id, self.pass_seqs, self.result_pending = 0, [], False
        self.poisoned: dict[int, str] = {}  # pass_id -> why its sequences fail at its result
        self.passes_completed = 0
        self.largest_pass_bytes = 0  # the largest StartPass sent (bytes)
        self.healthy = True
        self.failure = ""  # why the service stopped serving, after fail_all
        # speculative decoding: tokens drafted per sequence and pass (0: off)
        self.draft_tokens = config.draft_tokens if config.draft is not None else 0
        self.attach(workers)

    def attach(self, workers) -> None:
        """Serve on `workers` (fresh ones after a restart): a new stream schedule, no pass running."""
        self.workers = workers
        self.sched = StreamSchedule(self.plan)
        self.pass_base = self.pass_id  # pass_id of the schedule's pass k is pass_base + k + 1
        self.pass_seqs, self.result_pending, self.poisoned = [], False, {}
        self.paused = workers is None
        self.stall_since: float | None = None
        self.last_progress = time.monotonic()

    @property
    def in_pass(self) -> bool:
        return self.result_pending or self.sched.pass_running

    # ------------------------------------------------------------------ requests

    def add(self, seq: Sequence) -> None:
        assert seq.key not in self.by_key, seq.key
        self.by_key[seq.key] = seq
        self.admission.enter(caller_key(seq.client, seq.request.caller))
        self.waiting.append(seq)
        self.metrics.add_prompt_tokens(len(seq.prompt_ids))
        self.maybe_start_pass()
        self._gauges()

    def cancel(self, seq: Sequence) -> None:
        if self.result_pending and seq.seq_id in self.pass_seqs and seq.seq_id in self.running:
            seq.cancelled = True  # its KV cache is in use by this pass: it leaves at the result
        else:
            self.finish(seq, "cancelled")

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
        for seq in list(self.running.values()):
            self.fail(seq, code, f"request {seq.request.request_id} failed: {why}")

    def _forget(self, seq: Sequence) -> bool:
        if self.by_key.pop(seq.key, None) is None:
            return False  # already finished (e.g. cancelled, then its client vanished)
        self.admission.leave(caller_key(seq.client, seq.request.caller))
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.prefill.pop(seq.seq_id, None)
        if self.running.pop(seq.seq_id, None) is not None:
            self.admission.release(seq)
            if self.healthy and not self.paused:
                self.workers.compute.send(encode(Release([seq.seq_id])))
        self._gauges()
        return True

    def _gauges(self) -> None:
        self.metrics.set_requests(len(self.running), len(self.waiting))

    # ------------------------------------------------------------------ passes

    def maybe_start_pass(self) -> None:
        if self.result_pending or self.sched.pass_running or not self.healthy or self.paused:
            return
        budget = self.max_pass_tokens or float("inf")
        chunks, partial, new = [], [], {}
        for s in self.running.values():  # decoding sequences: one token each, never held back
            if s.seq_id not in self.prefill:
                chunks.append((s.seq_id, s.token_ids[-1:]))
                budget -= 1
        for s in self.running.values():  # prompts already started, in arrival order
            if s.seq_id in self.prefill and budget > 0:
                budget -= self._chunk(s, budget, chunks, partial)
        while self.waiting and len(self.running) < self.max_batch and budget > 0:
            seq = self.waiting[0]
            if not self.admission.fits(seq):
                break  # in order: it waits for KV memory, and so do those behind it
            self.waiting.popleft()
            self.admission.reserve(seq)
            self.running[seq.seq_id], self.prefill[seq.seq_id] = seq, 0
            new[seq.seq_id] = seq.sampling()
            budget -= self._chunk(seq, budget, chunks, partial)
        if not chunks:
            return
        # Drafts only for chunks that end where the next token is predicted (never mid-prompt).
        ends = {sid for sid, _ in chunks} - set(partial)
        draft = {s.seq_id: k for s in self.running.values() if s.seq_id in ends and (k := draft_count(
            s.request.draft_tokens, self.draft_tokens, s.max_new - len(s.token_ids)))}
        self.pass_id += 1
        self.pass_seqs = [sid for sid, _ in chunks]
        self.result_pending = True
        raw = encode(StartPass(self.pass_id, chunks, new, partial, draft))
        self.largest_pass_bytes = max(self.largest_pass_bytes, len(raw))
        self.workers.compute.send(raw)
        self.last_progress = time.monotonic()
        self.sched.begin_pass()
        self.pump()
        self._gauges()

    def _chunk(self, seq: Sequence, budget, chunks: list, partial: list) -> int:
        """Add the next piece of `seq`'s prompt (at most `budget` tokens); returns its length."""
        pos = self.prefill[seq.seq_id]
        n = int(min(len(seq.prompt_ids) - pos, budget))
        chunks.append((seq.seq_id, seq.prompt_ids[pos: pos + n]))
        if pos + n < len(seq.prompt_ids):
            self.prefill[seq.seq_id] = pos + n
            partial.append(seq.seq_id)
        else:
            del self.prefill[seq.seq_id]  # its prompt is all in: this pass samples its first token
        return n

    def pump(self) -> None:
        """Send every Load and Run the schedule allows now; account compute stalls."""
        if self.paused:
            return
        loads, runs = self.sched.step()
        for ld in loads:
            self.workers.io.send(encode(ld))
        for r in lend_experts(self, runs):  # a MoE block's Run lends the layer's resident experts
            self.workers.compute.send(encode(r))
        now = time.perf_counter()
        if self.sched.waiting_on_storage:
            self.stall_since = self.stall_since or now
        elif self.stall_since is not None:
            self.metrics.add_stall(now - self.stall_since)
            self.stall_since = None
        self.metrics.set_slots_in_flight(self.sched.slots_in_flight)

    def on_io(self, msg) -> None:
        self.last_progress = time.monotonic()
        if expert_loaded(self, msg):  # an expert unit's Loaded (a mixture of experts)
            return
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
        if expert_reply(self, msg):  # Routed / ExpertsDone (a mixture of experts)
            return
        if isinstance(msg, Done):
            self.metrics.observe_compute(msg.seconds, msg.count)
            if self.sched.on_done(msg.unit, msg.slot):
                self.passes_completed += 1
            self.pump()
        elif isinstance(msg, PassResult):
            if msg.pass_id != self.pass_id or not self.result_pending:
                return self.fault(f"compute worker sent the result of pass {msg.pass_id} while "
                                  f"pass {self.pass_id} was expected", "internal")
            self._pass_result(msg)
        elif isinstance(msg, WorkerError):
            log.error("compute worker: %s", msg.message)
            if msg.fatal or msg.pass_id is None:
                return self.fault(f"compute worker: {msg.message}", "internal")
            expert_pass_failed(self, msg)
            if msg.pass_id == self.pass_id and self.result_pending:
                # The pass is dropped (its remaining Runs come back Done without computing):
                # its sequences' caches are undefined, so they fail.
                self.result_pending = False
                why = self.poisoned.pop(msg.pass_id, None)  # garbage weights may well fail it
                code, text = ("io_error", f"pass {msg.pass_id}: {why}") if why else ("internal", msg.message)
                for sid in self.pass_seqs:
                    if sid in self.running:
                        self.fail(self.running[sid], code, text)
        if not self.sched.pass_running:
            self.maybe_start_pass()

    def _pass_result(self, msg: PassResult) -> None:
        self.result_pending = False
        why = self.poisoned.pop(msg.pass_id, None)
        if why is not None:  # a unit of this pass did not load: its output is garbage
            for sid in self.pass_seqs:
                if sid in self.running:
                    self.fail(self.running[sid], "io_error", f"pass {msg.pass_id}: {why}")
            return
        for sid, why in msg.failed.items():  # its logits could not be sampled: it alone fails
            seq = self.running.get(sid)
            if seq is not None:
                self.fail(seq, "internal", f"request {seq.request.request_id}: {why}")
        for sid in self.pass_seqs:  # cancelled mid-prefill: no token comes for them
            seq = self.running.get(sid)
            if seq is not None and seq.cancelled:
                self.finish(seq, "cancelled")
        m = self.metrics
        if msg.proposed:
            m.observe_draft_seconds(msg.draft_seconds)
        for sid, token in msg.tokens:
            seq = self.running.get(sid)
            if seq is None:
                continue  # failed or vanished meanwhile
            prev = seq.last_token_at
            delta, ids = "", []
            for t in [*msg.accepted.get(sid, ()), token]:  # drafts the target accepted come first
                delta += seq.append(t)
                ids.append(t)
                if seq.finish_reason is not None:
                    break
            m.add_generation_tokens(len(ids))
            if sid in msg.proposed:
                m.observe_speculation(msg.proposed[sid], len(msg.accepted.get(sid, ())))
            if prev is None:
                m.observe_ttft(seq.first_token_at - seq.arrived)
            else:
                for _ in ids:  # tokens of one pass share its latency
                    m.observe_itl((seq.last_token_at - prev) / len(ids))
            if seq.request.stream and (delta or seq.finish_reason is None):
                if not self.reply(seq.client, TokenChunk(seq.request.request_id, delta, ids)):
                    continue  # the client is gone: its requests were cancelled
            if seq.finish_reason is not None:
                self.finish(seq)
