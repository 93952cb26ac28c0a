"""Continuous batching: the request queue, the weight passes, and the worker replies that drive them.

    sched = BatchScheduler(plan, workers, reply, metrics, max_batch)
    sched.add(seq)                         # joins at the next weight pass
    sched.on_io(msg) / sched.on_compute(msg)   # Loaded / Done / PassResult / WorkerError
    sched.cancel(seq); sched.fail_all(code, why)

A pass serves every running sequence at once: new ones bring their whole prompt, the others their
last token. A new request joins at the next pass (at most max_batch run together), finished ones
leave after the pass that finished them (their KV caches are Released). The next pass starts as
soon as the previous one's sampled tokens are back; its first streamed units are already loading
(gdsllm.engine.planner), so storage never waits for sampling. `reply(client, msg) -> bool` sends to a
client; False means the client is gone, and its requests are cancelled.
"""
from __future__ import annotations

import logging
import time
from collections import deque

from ipc.messages import Done, Error, Loaded, PassResult, Release, StartPass, TokenChunk, WorkerError, encode

from gdsllm.engine.planner import ResidencyPlan, StreamSchedule
from gdsllm.engine.sequence import Sequence
from gdsllm.engine.speculative import draft_count

log = logging.getLogger("gdsllm.service.scheduler")


class BatchScheduler:
    def __init__(self, plan: ResidencyPlan, workers, reply, metrics, max_batch: int):
        self.sched = StreamSchedule(plan)
        self.workers, self.reply, self.metrics, self.max_batch = workers, reply, metrics, max_batch
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # seq_id -> sequence with a KV cache
        self.by_key: dict[tuple[bytes, str], Sequence] = {}
        self.pass_id, self.pass_seqs, self.result_pending = 0, [], False
        self.stall_since: float | None = None
        self.healthy = True
        self.failure = ""
        self.draft_tokens = 0  # speculative decoding: tokens drafted per sequence and pass (0: off)  # why the service stopped serving, after fail_all

    # ------------------------------------------------------------------ requests

    def add(self, seq: Sequence) -> None:
        assert seq.key not in self.by_key, seq.key
        self.by_key[seq.key] = seq
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
        """Fail every request in flight (a worker died, the service stops); no pass starts again."""
        if self.healthy:
            self.healthy, self.failure = False, why
        for seq in list(self.by_key.values()):
            self.fail(seq, code, f"request {seq.request.request_id} failed: {why}")

    def _forget(self, seq: Sequence) -> bool:
        if self.by_key.pop(seq.key, None) is None:
            return False  # already finished (e.g. cancelled, then its client vanished)
        if seq in self.waiting:
            self.waiting.remove(seq)
        if self.running.pop(seq.seq_id, None) is not None and self.healthy:
            self.workers.compute.send(encode(Release([seq.seq_id])))
        self._gauges()
        return True

    def _gauges(self) -> None:
        self.metrics.set_requests(len(self.running), len(self.waiting))

    # ------------------------------------------------------------------ passes

    def maybe_start_pass(self) -> None:
        if self.result_pending or self.sched.pass_running or not self.healthy:
            return
        new = {}
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting.popleft()
            self.running[seq.seq_id] = seq
            new[seq.seq_id] = seq.sampling()
        if not self.running:
            return
        chunks = [(s.seq_id, s.prompt_ids if s.seq_id in new else s.token_ids[-1:])
                  for s in self.running.values()]
        draft = {s.seq_id: k for s in self.running.values() if (k := draft_count(
            s.request.draft_tokens, self.draft_tokens, s.max_new - len(s.token_ids)))}
        self.pass_id += 1
        self.pass_seqs = [sid for sid, _ in chunks]
        self.result_pending = True
        self.workers.compute.send(encode(StartPass(self.pass_id, chunks, new, draft)))
        self.sched.begin_pass()
        self.pump()
        self._gauges()

    def pump(self) -> None:
        """Send every Load and Run the schedule allows now; account compute stalls."""
        loads, runs = self.sched.step()
        for ld in loads:
            self.workers.io.send(encode(ld))
        for r in runs:
            self.workers.compute.send(encode(r))
        now = time.perf_counter()
        if self.sched.waiting_on_storage:
            self.stall_since = self.stall_since or now
        elif self.stall_since is not None:
            self.metrics.add_stall(now - self.stall_since)
            self.stall_since = None
        self.metrics.set_slots_in_flight(self.sched.slots_in_flight)

    def on_io(self, msg) -> None:
        if isinstance(msg, Loaded):
            if msg.error:
                self.fail_all("internal", f"io worker: {msg.error}")
                return
            self.metrics.observe_load(msg.nbytes, msg.seconds, msg.io_path)
            self.sched.on_loaded(msg.unit, msg.slot)
            self.pump()
        elif isinstance(msg, WorkerError):
            log.error("io worker: %s", msg.message)
            if msg.fatal:
                self.fail_all("internal", f"io worker: {msg.message}")

    def on_compute(self, msg) -> None:
        if isinstance(msg, Done):
            self.metrics.observe_compute(msg.seconds)
            self.sched.on_done(msg.unit, msg.slot)
            self.pump()
        elif isinstance(msg, PassResult):
            assert msg.pass_id == self.pass_id and self.result_pending, (msg.pass_id, self.pass_id)
            self._pass_result(msg)
        elif isinstance(msg, WorkerError):
            log.error("compute worker: %s", msg.message)
            if msg.fatal:
                self.fail_all("internal", f"compute worker: {msg.message}")
            elif msg.pass_id == self.pass_id and self.result_pending:
                # The pass is dropped (its remaining Runs come back Done without computing):
                # its sequences' caches are undefined, so they fail.
                self.result_pending = False
                for sid in self.pass_seqs:
                    if sid in self.running:
                        self.fail(self.running[sid], "internal", msg.message)
        if not self.sched.pass_running:
            self.maybe_start_pass()

    def _pass_result(self, msg: PassResult) -> None:
        self.result_pending = False
        m = self.metrics
        for sid, token in msg.tokens:
            seq = self.running.get(sid)
            if seq is None:
                continue  # failed or vanished meanwhile
            if seq.cancelled:
                self.finish(seq, "cancelled")
                continue
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
