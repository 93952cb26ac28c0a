"""The compute worker process: owns the slot arena and runs the units the coordinator names over it.

    ctx = multiprocessing.get_context("spawn")          # CUDA needs spawn
    p = ctx.Process(target=run_compute_process, args=(config, endpoint, arena_bytes), daemon=True)

`run_compute_process(config: ServiceConfig, endpoint: str, arena_bytes: int) -> None` connects a
PAIR socket to `endpoint` (the coordinator binds it), loads `config.model`'s metadata, allocates
the slot arena of `arena_bytes` (POSIX shm on "cpu", one cudaMalloc on "cuda": the worker owns
it, so the weights it reads are memory of its own process: decode over a CUDA IPC mapping is
slower, as `benchmarks/probe_contexts.py --arena` shows) and replies
`ComputeReady(pid, device, backend, handle, arena_bytes)` (or `WorkerError(fatal=True)`). The
coordinator hands the arena to the I/O worker, then sends `MakeRunner(resident)` (the resident
units' offsets): the worker builds the Runner with its paged KV cache in the memory left
(gdsllm.service.admission.kv_cache_tokens), pins the resident units and replies `RunnerReady`
with the cache's size. Then, until `Shutdown` or the parent's death:

- `StartPass`: the engine scheduler's plan of one pass (gdsllm.engine.scheduler.PassPlan), run
  through a PlanRunner (gdsllm.engine.executor) as gdsllm.LLM runs it: the released sequences'
  state dropped, the new ones' KV block tables (the coordinator's books) and seeded samplers,
  drafts proposed; then its first Runs, carried in the same message. Messages from the
  coordinator are internal: no client size limit. A pass scheduled ahead (`StartPass.follows`)
  arrives while the pass before it runs and waits in the socket; read right after that pass's
  PassResult, its tokens are the ones that pass sampled here (PassPlan.resolve), so it begins
  without waiting for the coordinator.
- `Run(unit, slot, offset, count)`: the unit over the arena bytes at `offset` (or `count`
  consecutive resident units); `Done(unit, slot, seconds, count)` only after Runner.fence(), so
  the slot may then be refilled. After the head: `PassResult(pass_id, {seq_id: tokens}, seconds)`.
- A mixture of experts (the worker's gdsllm.service.expert_compute.ExpertCompute computes; the
  pass state and every reply stay here): a block's Done is followed by `Routed` (the experts its
  router picked), then the routed ones its Run lent (resident) run at once, and `RunExperts` runs
  the others from their arena slots; each answered by `ExpertsDone`.

With `config.draft`, a resident draft model proposes up to k tokens for each sequence in
`StartPass.draft`; the pass scores them and PassResult carries those accepted before the token
(gdsllm.engine.speculative: greedy or speculative-sampling acceptance, KV rollback).

A failing step is `WorkerError(message, pass_id=, unit=)` naming the pass and unit; the pass is
dropped (Runner.abort_pass), its remaining Runs get Done without computing; the worker serves
on. Messages are handled one at a time, in order: compute is the worker's only job.

`GDSLLM_PASS_TRACE=FILE`: per-pass timestamps (gdsllm.service.pass_trace).
`GDSLLM_TORCH_PROFILE=DIR:SKIP:PASSES` in the environment (as vLLM's VLLM_TORCH_PROFILER_DIR):
torch.profiler records passes SKIP+1 .. SKIP+PASSES of this worker (host ops and kernels) and
writes DIR/compute-<pid>.json, a Chrome trace (benchmarks/profile_decode.py reads it).
"""
from __future__ import annotations

import contextlib
import os
import time

import torch
import zmq

from ipc import sockets
from ipc.arena import Arena
from ipc.messages import (RESIDENT, ComputeReady, Done, ExpertsDone, MakeRunner, PassResult,
                          ProtocolError, Run, RunExperts, RunnerReady, Shutdown, StartPass,
                          WorkerError, decode)

from gdsllm.config import ServiceConfig
from gdsllm.format.metadata import load_model_meta
from gdsllm.engine.planner import shared_embedding
from gdsllm.models.views import unit_tensors
from gdsllm.service.pass_trace import PassTrace
from gdsllm.service.threads import set_threads

PROFILE_ENV = "GDSLLM_TORCH_PROFILE"
POLL_S = 0.5  # how often an idle worker checks that its parent is alive
SEND_TIMEOUT_S = 30.0  # a coordinator that takes no reply for this long is gone
FLUSH_MS = 2000  # bounded wait at exit for queued replies (the socket default is LINGER 0)


def run_compute_process(config: ServiceConfig, endpoint: str, arena_bytes: int) -> None:
    """Entry point of the compute worker process (see the module docstring). Returns on
    Shutdown, when the parent process dies, or after a fatal error it has reported."""
    sockets.worker_signals()
    set_threads("compute")
    ComputeWorker(config, endpoint, arena_bytes).run()
    sockets.fast_exit()  # its cleanup is done: skip the slow interpreter teardown


def pass_profiler(spec: str | None):
    """A started torch.profiler over passes, from PROFILE_ENV's value "DIR:SKIP:PASSES" (None:
    no profiling). step() after each pass; the trace is written when PASSES have been recorded."""
    if not spec:
        return None
    where, skip, passes = (spec.split(":") + ["20", "8"])[:3]
    out = os.path.join(where, f"compute-{os.getpid()}.json")
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(
        activities=acts, schedule=torch.profiler.schedule(skip_first=int(skip), wait=0, warmup=1, active=int(passes)),
        on_trace_ready=lambda p: p.export_chrome_trace(out))
    prof.start()
    return prof


class _Exit(Exception):
    """Shutdown, or a fatal error already reported: leave the loop."""


class ComputeWorker:
    def __init__(self, config: ServiceConfig, endpoint: str, arena_bytes: int):
        self.config, self.arena_bytes = config, arena_bytes
        self.parent = sockets.ParentWatch()
        self.sock = sockets.pair(sockets.context(), endpoint, bind=False)
        self.arena: Arena | None = None
        self.runner = None  # made on MakeRunner (gdsllm.engine.runner.Runner)
        self.plans = None  # gdsllm.engine.executor.PlanRunner over the runner
        self.pass_id: int | None = None  # the pass in progress
        self.pass_failed = False
        self.pass_seconds = 0.0
        self.sampled: tuple[int, dict[int, list[int]]] | None = None  # the last pass's tokens, if it ended well
        self.trace = PassTrace("worker")
        self.speculator = None  # with config.draft: gdsllm.engine.speculative.Speculator
        self.experts = None  # made with the runner: gdsllm.service.expert_compute.ExpertCompute
        self.profiler = pass_profiler(os.environ.get(PROFILE_ENV))

    def run(self) -> None:
        try:
            try:
                ready = self._start()
            except Exception as e:
                self.send(WorkerError(f"compute worker failed to start: {type(e).__name__}: {e}",
                                       fatal=True))
                return
            self.send(ready)
            self._loop()
        except (TimeoutError, _Exit):
            pass  # told to stop, or the coordinator stopped reading
        finally:
            if self.profiler is not None:
                self.profiler.stop()
            if self.arena is not None:
                self.arena.close()
            self.sock.close(linger=FLUSH_MS)  # a last WorkerError must reach the coordinator
            sockets.context().term()  # returns once queued replies are out (or FLUSH_MS passed)

    def _start(self) -> ComputeReady:
        from gdsllm.engine.runner import compute_dtype  # imported here: torch model code is the slow part of start-up
        self.meta = load_model_meta(self.config.model)
        device = self.config.device
        if device == "cuda":
            device = f"cuda:{torch.cuda.current_device()}"
        self.device = torch.device(device)
        self.dtype = compute_dtype(self.device, self.meta.dtype, self.meta.qtypes)
        self.shared_embedding = shared_embedding(self.meta)  # the head reads the embed unit's bytes
        if self.config.draft is not None:
            from gdsllm.engine.speculative import make_speculator
            self.speculator = make_speculator(  # a token of KV until the target's is sized
                self.meta, self.config.draft, self.device, self.config.draft_tokens,
                adaptive=self.config.draft_adaptive, kv_tokens=1, tree=self.config.draft_tree)
        self.arena = Arena.create(self.device.type, self.arena_bytes, self.device.index or 0)
        spec = self.arena.spec
        return ComputeReady(pid=os.getpid(), device=str(self.device), backend=spec.backend,
                            handle=spec.handle, arena_bytes=spec.nbytes)

    def _loop(self) -> None:
        while True:
            ready = self.sock.poll(int(POLL_S * 1000), zmq.POLLIN)
            if not self.parent.alive():
                return
            if ready:
                while self.sock.poll(0, zmq.POLLIN):
                    self._handle(self.sock.recv(zmq.NOBLOCK))

    def _handle(self, raw: bytes) -> None:
        received = time.monotonic()
        try:
            msg = decode(raw, max_bytes=None)  # internal: a pass may carry many MiB of prompt ids
        except ProtocolError as e:
            self.send(WorkerError(f"compute worker: bad message: {e}"))
            return
        if isinstance(msg, Run):
            self._run(msg)
        elif isinstance(msg, StartPass):
            self.trace("plan_received", msg.pass_id, received)
            self._start_pass(msg)
        elif isinstance(msg, RunExperts):  # a mixture of experts: ExpertsDone either way
            self._run_experts(msg.pass_id, msg.unit, msg.experts)
        elif isinstance(msg, MakeRunner):
            self._make_runner(msg)
        elif isinstance(msg, Shutdown):
            raise _Exit
        else:
            self.send(WorkerError(f"compute worker: unexpected message {type(msg).__name__}"))

    # ------------------------------------------------------------------ handlers

    def _make_runner(self, msg: MakeRunner) -> None:
        if self.runner is not None:
            self.send(WorkerError("compute worker: the runner is already made"))
            return
        what = "allocate its KV cache"  # after the arena: it takes a share of the memory left
        try:
            self._build()
            what = "pin the resident units"
            for u, off in msg.resident.items():
                if not 0 <= u < len(self.meta.units):
                    raise ValueError(f"unit {u} out of range: the model has {len(self.meta.units)} units")
                unit = self.meta.units[u]
                self.runner.pin(u, unit_tensors(unit, self.arena.view(off, unit.nbytes)))
            if self.speculator is not None:  # a self:N draft reads the pinned units
                what = "start its draft"
                self.speculator.attach(self.runner)
        except Exception as e:
            self.send(WorkerError(f"compute worker cannot {what}: {e}", fatal=True))
            raise _Exit from None
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        self.send(RunnerReady(free, self.runner.cache.capacity, self.runner.cache.block_size))

    def _build(self) -> None:
        """The Runner with its paged KV cache in the memory left (resident units are pinned to it
        next: CUDA graphs run them)."""
        from gdsllm.engine.executor import PlanRunner
        from gdsllm.engine.runner import Runner, reserve_scratch
        from gdsllm.service.admission import kv_cache_tokens
        from gdsllm.service.expert_compute import ExpertCompute
        draft = self.speculator.draft if self.speculator is not None else None
        reserve_scratch(self.device, self.dtype, (self.meta, getattr(draft, "meta", None)))
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        kv = kv_cache_tokens(self.meta, self.config, free, draft.kv_token_bytes if draft else 0)
        self.runner = Runner(self.meta.params, self.device, self.dtype, architecture=self.meta.architecture, kv_tokens=kv,
                             cpu_compile=self.config.cpu_compile)
        if draft is not None:  # it holds the same sequences: as many tokens, from the same room
            draft.size_kv(self.runner.cache.capacity)
        self.experts = ExpertCompute(self.meta, self.runner, self.arena.view)
        self.plans = PlanRunner(self.runner, self.speculator)

    def _start_pass(self, msg: StartPass) -> None:
        if self.pass_id is not None and not self.pass_failed:
            self.send(WorkerError(f"pass {msg.pass_id}: pass {self.pass_id} is still in progress",
                                   pass_id=msg.pass_id))
            return
        from gdsllm.engine.sampling import SamplingParams
        from gdsllm.engine.scheduler import PassPlan
        self.pass_id, self.pass_failed, self.pass_seconds = msg.pass_id, False, 0.0
        before, self.sampled = self.sampled, None
        try:
            if self.plans is None:
                raise RuntimeError("no runner is made (MakeRunner first)")
            new = {sid: SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed,
                                       draft_tree=s.draft_tree) for sid, s in msg.sampling.items()}
            plan = PassPlan(msg.pass_id, [(sid, list(t)) for sid, t in msg.chunks], new, msg.tables,
                            frozenset(msg.partial), msg.draft, tuple(msg.released), follows=msg.follows)
            if msg.follows is not None:  # scheduled ahead: the tokens of the pass before, here
                if before is None or before[0] != msg.follows:
                    raise ValueError(f"it follows pass {msg.follows}, which gave no tokens here")
                plan = plan.resolve(before[1])
            self.plans.begin(plan)
        except Exception as e:
            self.pass_failed = True
            self.send(WorkerError(f"pass {msg.pass_id}: start failed: {type(e).__name__}: {e}", pass_id=msg.pass_id))
        self.trace("plan_launched", msg.pass_id)
        for unit, slot, offset, count in msg.runs:
            try:
                run = Run(unit, slot, offset, count)
            except ValueError as e:  # the coordinator broke the protocol: it replaces the workers
                self.send(WorkerError(f"compute worker: bad run in StartPass: {e}"))
                return
            self._run(run)

    def _run(self, msg: Run) -> None:
        if self.pass_id is None or self.pass_failed:
            if self.pass_id is None:
                self.send(WorkerError(f"Run(unit {msg.unit}) outside a pass", unit=msg.unit))
            self.send(Done(msg.unit, msg.slot, 0.0, msg.count))  # nothing ran: the slot is free
            return
        t0 = time.perf_counter()
        routed = None
        try:
            if self.runner is None:
                raise RuntimeError("no runner is made (MakeRunner first)")
            if not 0 <= msg.unit <= msg.unit + msg.count - 1 < len(self.meta.units):
                raise ValueError(f"unit {msg.unit} (count {msg.count}) out of range: the model has "
                                 f"{len(self.meta.units)} units")
            for i in range(msg.unit, msg.unit + msg.count):
                unit = self.meta.units[i]
                head = unit.kind == "head"
                if unit.kind == "embed" and self.shared_embedding and msg.slot != RESIDENT:
                    raise ValueError("the embedding of a tied model must be resident: the head reads it")
                weights = self.runner.pinned.get(i) if msg.slot == RESIDENT else None
                if weights is None:
                    if msg.count > 1:
                        raise ValueError(f"unit {i} was not announced resident (MakeRunner)")
                    weights = unit_tensors(unit, self.arena.view(msg.offset, unit.nbytes))
                self.runner.run_unit(unit, weights)
                if unit.kind == "block" and self.meta.params.num_experts:  # the last of its run
                    routed = self.experts.after_block(self.pass_id, unit, weights)  # sent after Done
            if msg.slot != RESIDENT:
                # A streamed slot may be refilled once Done is sent: its GPU work must be over.
                # Resident weights are never overwritten: no fence (`seconds` is launch time).
                self.runner.fence()
        except Exception as e:
            self._fail(msg, e)
            return
        seconds = time.perf_counter() - t0
        self.pass_seconds += seconds
        self.send(Done(msg.unit, msg.slot, seconds, msg.count))
        if routed is not None:  # a MoE block: its routing out, then the experts its Run lent
            self.send(routed)  # the coordinator reads the misses while the hits run
            hits = self.experts.lent_hits(msg.experts, routed)
            if hits:
                self._run_experts(routed.pass_id, routed.unit, hits)
        if head:
            self._finish_pass(msg)

    def _run_experts(self, pass_id: int, block: int, experts: list[tuple[int, int]]) -> None:
        """Run expert units [(unit, arena offset)] of MoE block `block`; one ExpertsDone either
        way (the slots must come back). Outside the pass, or in a failed one, nothing runs."""
        t0 = time.perf_counter()
        ran = [u for u, _ in experts]
        if self.pass_id is None or self.pass_failed or pass_id != self.pass_id:
            if self.pass_id is None or pass_id != self.pass_id:
                self.send(WorkerError(f"RunExperts of pass {pass_id} outside it", unit=block))
            self.send(ExpertsDone(pass_id, block, ran, 0.0))
            return
        try:
            self.experts.run(experts)
        except Exception as e:
            self.plans.abort()
            self.pass_failed = True
            self.send(WorkerError(f"pass {pass_id}, experts of unit {block}: "
                                  f"{type(e).__name__}: {e}", pass_id=pass_id, unit=block))
        seconds = time.perf_counter() - t0
        self.pass_seconds += seconds
        self.send(ExpertsDone(pass_id, block, ran, seconds))

    def _finish_pass(self, msg: Run) -> None:
        t0 = time.perf_counter()
        try:
            r = self.plans.finish()
        except Exception as e:
            self._fail(msg, e, done_sent=True)
            return
        seconds = self.pass_seconds + time.perf_counter() - t0
        t = time.monotonic()
        self.send(PassResult(self.pass_id, r.tokens, seconds, r.proposed, r.failed, r.draft_seconds))
        self.trace("result_sent", self.pass_id, t)
        self.sampled = (self.pass_id, r.tokens)  # what a pass scheduled ahead of this one reads
        self.pass_id = None
        if self.profiler is not None:
            self.profiler.step()

    def _fail(self, msg: Run, e: Exception, done_sent: bool = False) -> None:
        unit = self.meta.units[msg.unit].name if 0 <= msg.unit < len(self.meta.units) else msg.unit
        if self.plans is not None:
            self.plans.abort()
            with contextlib.suppress(Exception):  # the device may be what failed
                self.runner.fence()
        self.pass_failed = True
        self.send(WorkerError(f"pass {self.pass_id}, unit {unit}: {type(e).__name__}: {e}",
                               pass_id=self.pass_id, unit=msg.unit))
        if not done_sent:  # exactly one Done per Run: the coordinator frees the slot on it
            self.send(Done(msg.unit, msg.slot, 0.0, msg.count))

    def send(self, msg) -> None:
        sockets.send(self.sock, msg, SEND_TIMEOUT_S)
