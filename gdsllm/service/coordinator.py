"""The coordinator: the service's only brain (`gdsllm serve` runs it as its main process).

    run_coordinator(ServiceConfig(model=path, endpoint="tcp://127.0.0.1:5555"))  # until SIGINT/SIGTERM

or, inside a running event loop: `c = Coordinator(config); await c.start(); await c.serve(); ...
c.request_stop()`. Clients (DEALER) send Generate / Cancel / Health to a ZeroMQ ROUTER; the
coordinator tokenizes, batches continuously (a request joins at the next weight pass, finished ones
leave, at most max_batch), plans residency and streaming (gdsllm.engine.planner), drives the I/O and compute
workers (gdsllm.service.worker_set) and streams TokenChunk then Final back. Malformed messages get
Error(bad_request) and everyone else is served on, requests over 1 MiB too (ipc.codec.MAX_REQUEST_BYTES;
frames over MAX_FRAME_BYTES, 4 MiB, disconnect their sender: zmq.MAXMSGSIZE), requests beyond a
client's in-flight cap or a full queue get Error(busy), and with `curve_secret_key` only CurveZMQ
clients holding the server's public key get through (with `curve_allow`, only those whose own public
key is listed: a ZAP handler).
Supervision (dead workers replaced, the watchdog): see Coordinator.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import zmq
import zmq.asyncio

from ipc import sockets
from ipc.codec import MAX_FRAME_BYTES, peek_request_id
from ipc.messages import (Cancel, Done, Error, Final, Generate, Health, HealthReply, PassResult,
                          ProtocolError, WorkerError, decode, encode)

from gdsllm.config import ServiceConfig
from gdsllm.engine.budget import free_device_bytes, plan_memory, weights_budget
from gdsllm.service.admission import Admission, caller_key, kv_itemsize
from gdsllm.service.metrics import ServiceMetrics
from gdsllm.service.progress import PassProgress
from gdsllm.service.batch import Batch
from gdsllm.service.requests import Sequence, encode_prompt, validate_request
from gdsllm.service.supervisor import Supervisor
from gdsllm.service.worker_set import WorkerSet, WorkerStartError  # noqa: F401  (re-exported)

log = logging.getLogger("gdsllm.service.coordinator")
SNDHWM = 100_000  # queued replies per client before it counts as gone (token chunks are tiny)
TOKENIZE_THREADS = 2  # prompts tokenized (chat templates rendered) at once, off the event loop
MAX_TOKENIZING_CHARS = 64 << 20  # prompt characters waiting to be tokenized; more get busy


class Coordinator:
    """One service: the model's plan, the workers, the client frontend (DEALER clients; replies go
    to the sender's identity). `io_target` / `compute_target` replace the worker entry points
    (tests); by default gdsllm.service.io_worker.run_io_process and gdsllm.service.compute_worker.run_compute_process.
    Dead or stalled workers are replaced by gdsllm.service.supervisor."""

    def __init__(self, config: ServiceConfig, *, io_target=None, compute_target=None):
        from gdsllm.format.metadata import load_model_meta
        from gdsllm.engine.tokenizer import Tokenizer
        self.config = config
        self.meta = load_model_meta(config.model)
        self.tokenizer = Tokenizer(self.meta)
        self.max_token_chars = self.tokenizer.max_token_chars  # read at once: it parses the tokenizer
        p = self.meta.params
        self.eos_ids = frozenset(p.eos_token_ids)
        self.max_context = p.max_position_embeddings
        draft = None
        if config.draft is not None:  # speculative decoding: the resident draft's bytes come first
            from gdsllm.engine.speculative import load_draft_meta
            draft = load_draft_meta(self.meta, config.draft)
        budget = weights_budget(config.vram_budget, self.meta.total_bytes + (draft.total_bytes if draft else 0),
                                free_device_bytes(config.device))
        self.memory = plan_memory(self.meta, budget=budget, window=config.prefetch_window, draft=draft,
                                  itemsize=kv_itemsize(self.meta, config))
        self.plan, self.expert_slots = self.memory.weights, self.memory.expert_slots
        self.draft_bytes = self.memory.draft_bytes
        self.metrics = ServiceMetrics()
        self.targets = (io_target, compute_target)
        self.batch: Batch | None = None
        self.admission: Admission | None = None
        self.ctx = zmq.asyncio.Context()
        self.ctx.setsockopt(zmq.LINGER, 0)  # closes that must flush say so (the front: 1 s)
        self.front = None
        self.allow_list: sockets.CurveAllowList | None = None
        self.supervisor = Supervisor(self)  # owns the workers and the health (status, detail)
        self.next_seq = 1
        self.stopped = asyncio.Event()
        self.http = None
        self.tasks: list[asyncio.Task] = []
        self.worker_tasks: list[asyncio.Task] = []
        self.prefill = PassProgress()
        self.tokenize_pool = ThreadPoolExecutor(TOKENIZE_THREADS, thread_name_prefix="gdsllm-tokenize")
        self.tokenizing: dict[tuple[bytes, str], asyncio.Future] = {}  # (client, request_id) -> work
        self.tokenizing_chars = 0  # prompt characters in self.tokenizing
        self.tokenizing_by_client: Counter[bytes] = Counter()  # per caller_key: its requests in self.tokenizing

    @property
    def workers(self) -> WorkerSet | None:
        """The current I/O and compute workers (the supervisor replaces them after a fault)."""
        return self.supervisor.workers

    @property
    def exit_code(self) -> int:
        """The process's exit status: 0, or gdsllm.service.supervisor.EXIT_DEGRADED."""
        return self.supervisor.exit_code

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Spawn and handshake the workers, load the resident units, bind the client endpoint."""
        workers = await self.supervisor.bring_up()
        self.admission = Admission(self.config.max_inflight_per_client, self.config.max_waiting)
        experts = None
        if self.expert_slots is not None:
            from gdsllm.service.experts import ExpertScheduler
            experts = ExpertScheduler(self.meta, self.expert_slots, self.config.expert_prefetch)
        self.batch = Batch(self.meta, self.plan, workers, self._reply, self.metrics, self.config,
                           self.admission, self.supervisor.fault, experts)
        curve = None
        if self.config.curve_secret_key is not None:
            curve = sockets.load_secret_key(self.config.curve_secret_key)
        if self.config.curve_allow is not None:  # before the bind: no handshake may skip it
            allowed = sockets.load_allowed_keys(self.config.curve_allow)
            # the HTTP front end connects with the server's own key pair (it holds the secret)
            self.allow_list = sockets.CurveAllowList(self.ctx, allowed | {curve[0]})
        self.front = sockets.router(self.ctx, self.config.endpoint, max_msg=MAX_FRAME_BYTES, curve=curve)
        self.front.setsockopt(zmq.SNDHWM, SNDHWM)
        m = self.metrics
        from gdsllm.version import __version__
        m.set_build_info(__version__, self.config.device, self.supervisor.io_path)
        m.set_budget(self.config.vram_budget, self.plan.resident_bytes + self.draft_bytes)
        if self.config.metrics_port is not None:
            self.http = m.start_http(self.config.metrics_host, self.config.metrics_port)
        self.supervisor.started()
        self.tasks = [asyncio.create_task(f()) for f in (self._front_loop, self.supervisor.watchdog)]
        self.serve_workers()
        log.info("serving %s on %s: %d resident units, %d streamed through %d slots, io %s, "
                 "KV budget %d bytes%s", self.meta.root, self.config.endpoint,
                 len(self.plan.resident_offsets), len(self.plan.streamed), self.plan.num_slots,
                 self.supervisor.io_path, self.batch.kv_bytes()[0], ", CurveZMQ" if curve else "")

    def serve_workers(self) -> None:
        """Relay the (new) workers' replies to the scheduler and start streaming."""
        self.worker_tasks = [asyncio.create_task(self._worker_loop("io", self.workers.io, self.batch.on_io)),
                             asyncio.create_task(self._worker_loop("compute", self.workers.compute,
                                                                   self._on_compute))]
        self.batch.pump()  # the first pass's streamed units load while the service waits for requests
        self.batch.maybe_start_pass()

    def stop_worker_loops(self) -> None:
        for t in self.worker_tasks:
            t.cancel()
        self.worker_tasks = []

    def request_stop(self) -> None:
        self.stopped.set()

    async def serve(self) -> None:
        await self.stopped.wait()

    async def close(self) -> None:
        """Stop serving, fail what is in flight, stop the workers, release every resource."""
        for t in self.tasks + self.worker_tasks + [self.supervisor.task]:
            if t is not None:
                t.cancel()
        self.tokenize_pool.shutdown(wait=False, cancel_futures=True)
        for (client, rid), work in list(self.tokenizing.items()):
            work.cancel()
            self._reply(client, Error(rid, "internal", "the server is shutting down"))
        self.tokenizing.clear()
        if self.batch is not None:
            self.batch.fail_all("internal", "the server is shutting down")
        if self.front is not None:
            self.front.close(linger=1000)  # let the "shutting down" errors reach their clients
        if self.workers is not None:
            await self.workers.stop()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        if self.allow_list is not None:
            self.allow_list.stop()
        self.ctx.term()
        if self.front is not None and self.config.endpoint.startswith("ipc://"):
            with contextlib.suppress(OSError):  # ZeroMQ leaves the socket file it bound
                os.unlink(self.config.endpoint[len("ipc://"):])

    # ------------------------------------------------------------------ client side

    async def _front_loop(self) -> None:
        while True:
            frames = await self.front.recv_multipart()
            try:
                self._client_message(frames)
            except Exception:  # a bug must not take the service down for everyone
                log.exception("error handling a client message")

    def _client_message(self, frames: list[bytes]) -> None:
        client = frames[0]
        if len(frames) != 2:  # a DEALER sends one frame per message; ROUTER adds the identity
            return self._reply(client, Error("", "bad_request", f"expected one frame per message, "
                                             f"got {len(frames) - 1}"))
        raw = frames[1]
        try:
            msg = decode(raw)
        except ProtocolError as e:
            return self._reply(client, Error(peek_request_id(raw), "bad_request", str(e)))
        if isinstance(msg, Generate):
            self._generate(client, msg)
        elif isinstance(msg, Cancel):
            self._cancel(client, msg.request_id)
        elif isinstance(msg, Health):
            self._reply(client, self._health(msg.request_id))
        else:
            self._reply(client, Error(getattr(msg, "request_id", ""), "bad_request",
                                      f"{type(msg).TYPE!r} is not a client message"))

    def _generate(self, client: bytes, msg: Generate) -> None:
        """Check what is cheap at once, then tokenize (chat template included) on the tokenizing
        threads: a huge prompt never holds the event loop, so every other stream goes on."""
        rid, key = msg.request_id, (client, msg.request_id)
        if self.supervisor.refusing:
            return self._reply(client, Error(rid, "worker_died", f"service degraded: {self.supervisor.detail}"))
        if key in self.batch.by_key or key in self.tokenizing:
            return self._reply(client, Error(rid, "bad_request", f"request {rid!r} is already in flight"))
        # the cap counts per caller (an HTTP front end serves many); requests being tokenized count
        # toward the queue (beyond the batch's free places) and as the caller's, and their
        # characters are bounded too
        caller = caller_key(client, msg.caller)
        busy = self.admission.refuse(caller, self.batch.queued(len(self.tokenizing)),
                                     self.tokenizing_by_client[caller])
        chars = _prompt_chars(msg)
        if not busy and self.tokenizing_chars + chars > MAX_TOKENIZING_CHARS:
            busy = f"{self.tokenizing_chars} prompt characters are waiting to be tokenized"
        if busy:
            return self._reply(client, Error(rid, "busy", f"request {rid}: {busy}"))
        try:
            validate_request(msg)
            self._check_length(msg, chars)
        except ValueError as e:
            return self._reply(client, Error(rid, "bad_request", str(e)))
        work = asyncio.get_running_loop().run_in_executor(
            self.tokenize_pool, encode_prompt, msg, self.tokenizer, self.meta.params)
        self.tokenizing[key] = work
        self.tokenizing_chars += chars
        self.tokenizing_by_client[caller] += 1
        work.add_done_callback(lambda f: self._tokenized(client, msg, f, chars))

    def _check_length(self, msg: Generate, chars: int) -> None:
        """ValueError for a prompt too long for the context whatever its tokens: before tokenizing,
        from its length in characters (a token stands for at most max_token_chars of them)."""
        per_token = self.max_token_chars
        if per_token is None:
            return
        if chars > per_token * self.max_context:
            raise ValueError(f"request {msg.request_id}: prompt of {chars} characters cannot fit the "
                             f"model's context of {self.max_context} tokens (a token of this "
                             f"tokenizer stands for at most {per_token} characters)")

    def _tokenized(self, client: bytes, msg: Generate, work: asyncio.Future, chars: int) -> None:
        """The prompt's token ids are ready (or its tokenizing failed): the request joins the batch."""
        rid, key = msg.request_id, (client, msg.request_id)
        self.tokenizing_chars -= chars
        caller = caller_key(client, msg.caller)
        self.tokenizing_by_client[caller] -= 1
        if not self.tokenizing_by_client[caller]:
            del self.tokenizing_by_client[caller]
        if self.tokenizing.get(key) is not work or work.cancelled():
            return  # cancelled meanwhile (its Final was sent), or the service is closing
        del self.tokenizing[key]
        if self.supervisor.refusing:
            return self._reply(client, Error(rid, "worker_died", f"service degraded: {self.supervisor.detail}"))
        try:
            ids = work.result()  # ValueError, or a template/tokenizer failure on user input
            seq = Sequence(self.next_seq, client, msg, ids, self.tokenizer, self.eos_ids, self.max_context)
            too_big = self.batch.never_fits(seq)
            if too_big:
                raise ValueError(too_big)
        except Exception as e:
            return self._reply(client, Error(rid, "bad_request", str(e)))
        busy = self.admission.refuse(client, self.batch.queued())
        if busy:
            return self._reply(client, Error(rid, "busy", f"request {rid}: {busy}"))
        self.next_seq += 1
        self.batch.add(seq)

    def _cancel(self, client: bytes, rid: str) -> None:
        work = self.tokenizing.pop((client, rid), None)
        if work is not None:  # still being tokenized: it ends here, with nothing generated
            work.cancel()
            return self._reply(client, Final(rid, "", [], "cancelled", 0, 0, 0.0, 0.0))
        seq = self.batch.by_key.get((client, rid))
        if seq is None:
            return self._reply(client, Error(rid, "not_found", f"no request {rid!r} in flight"))
        self.batch.cancel(seq)

    def _reply(self, client: bytes, msg) -> bool:
        """Send to one client; False (and its requests cancelled) if it is gone or not reading."""
        # NOBLOCK: the send happens now or fails now (never a pending future that reorders)
        sent = self.front.send_multipart([client, encode(msg)], flags=zmq.NOBLOCK)
        e = sent.exception() if sent.done() else None
        if e is None:
            return True
        if isinstance(e, zmq.ZMQError):  # EHOSTUNREACH (ROUTER_MANDATORY: the client left) or EAGAIN
            n = sum(1 for seq in self.batch.by_key.values() if seq.client == client)
            if n:
                log.info("client %s unreachable (%s): cancelling its %d request(s)", client.hex(),
                         e.strerror, n)
            else:
                log.debug("client %s left before a reply to it (%s)", client.hex(), e.strerror)
            self.batch.cancel_client(client)
            return False
        raise e

    def _health(self, rid: str) -> HealthReply:
        kv_total, kv_held = self.batch.kv_bytes()
        return HealthReply(request_id=rid, status=self.supervisor.status, model=str(self.meta.root),
                           backend=self.config.device, io_path=self.supervisor.io_path,
                           vram_budget_bytes=self.config.vram_budget or self.plan.arena_bytes,
                           resident_units=self.plan.resident_names, streamed_units=len(self.plan.streamed),
                           prefetch_window=self.plan.num_slots,
                           requests_running=len(self.batch.running),
                           requests_waiting=len(self.batch.waiting), detail=self.supervisor.detail,
                           restarts=self.supervisor.restarts, kv_budget_bytes=kv_total,
                           kv_reserved_bytes=kv_held)

    # ------------------------------------------------------------------ workers

    def _on_compute(self, msg) -> None:
        if isinstance(msg, Done):  # a long prefill is logged as it goes (gdsllm.service.progress)
            self.prefill.unit_done(self.batch.pass_id, msg.unit + 1, len(self.meta.units), lambda: sum(
                len(s.prompt_ids) for s in self.batch.running.values() if not s.token_ids))
        elif isinstance(msg, PassResult):
            self.prefill.pass_done(msg.pass_id)
            if msg.pass_id == self.batch.pass_id:  # health follows what passes do (supervisor)
                self.supervisor.pass_outcome(self.batch.poisoned.get(msg.pass_id))
        elif isinstance(msg, WorkerError) and msg.pass_id in self.batch.poisoned:
            self.supervisor.pass_outcome(self.batch.poisoned[msg.pass_id])
        self.batch.on_compute(msg)

    async def _worker_loop(self, name: str, sock, handle) -> None:
        while True:
            raw = await sock.recv()
            try:
                handle(decode(raw, max_bytes=None))  # internal: no client size limit
            except Exception as e:  # a protocol violation or a bug: replace the workers, say why
                log.exception("handling a message from the %s worker", name)
                self.supervisor.fault(f"internal error on a {name} worker message: {type(e).__name__}: {e}",
                            "internal")


def _prompt_chars(msg: Generate) -> int:
    return len(msg.prompt) if msg.messages is None else sum(len(m.content) for m in msg.messages)


async def _run(config: ServiceConfig) -> int:
    c = Coordinator(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, c.request_stop)
    try:
        await c.start()
        await c.serve()
    finally:
        log.info("shutting down")
        await c.close()
    return c.exit_code


def run_coordinator(config: ServiceConfig) -> int:
    """Serve until SIGINT/SIGTERM, then shut down cleanly (the body of `gdsllm serve`); the exit
    status: 0, or EXIT_DEGRADED when `exit_on_degraded` stopped it."""
    import uvloop
    from gdsllm.service.threads import set_threads
    set_threads("coordinator")
    return uvloop.run(_run(config))
