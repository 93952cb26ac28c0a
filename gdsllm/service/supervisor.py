"""Supervision of the coordinator's workers: bring them up, notice faults, replace them.

    sup = Supervisor(coordinator)
    workers = await sup.bring_up()          # spawn, handshake, load the resident units
    sup.started()                           # health "ok": the coordinator serves
    sup.fault("the io worker died (exit code -9)", "worker_died")   # from any callback
    asyncio.create_task(sup.watchdog())
    sup.status, sup.detail, sup.workers, sup.io_path, sup.exit_code   # read by the coordinator

The supervisor owns the service's health and its current workers: it alone writes them, and the
coordinator reads them through these public names (its `workers` and `exit_code` are properties
over them). From the coordinator it reads the plan and configuration and calls public methods
only (`request_stop`, `stop_worker_loops`, `serve_workers`, and the batch scheduler's).

A fault (a worker died, an error no pass can own, a pass with no worker reply for
`pass_timeout_s`) fails the RUNNING requests at once with its code (`worker_died`, `timeout`,
`internal`): their KV caches die with the workers. Waiting and new requests stay queued. Both
workers are then killed and a fresh pair is brought up, after a back-off of BACKOFF_S * 2**(k-1)
seconds before attempt k; health says "restarting" until the new workers have loaded the resident
units, then "ok". After `restart_limit` faults or failed attempts in a row with no pass completed
between them (a crash loop: a corrupt resident unit, a worker that cannot start), the service is
"degraded" for good, every request fails with `worker_died`, and health says why.

Health follows outcomes, not only processes: IO_FAILURES_DEGRADED passes in a row that failed
reading or verifying a unit (corrupt, truncated, deleted) make health "degraded", naming the
unit's error; requests are still tried, and the first pass that completes makes it "ok" again. A
worker seen stopped (SIGSTOP: state T in /proc) for STOPPED_S is a fault ("timeout") at once,
without waiting for `pass_timeout_s`. With `exit_on_degraded`, the process exits (code
EXIT_DEGRADED) as soon as it is degraded, for systemd or compose to restart it.
"""
from __future__ import annotations

import asyncio
import logging
import time

from ipc.messages import Load, Loaded, WorkerError, decode, encode

from gdsllm.engine.planner import StreamSchedule
from gdsllm.service.progress import LoadProgress
from gdsllm.service.worker_set import WorkerSet, WorkerStartError

log = logging.getLogger("gdsllm.service.supervisor")
BACKOFF_S, MAX_BACKOFF_S = 0.25, 10.0
IO_FAILURES_DEGRADED = 3  # passes in a row failed by a unit read or checksum: health "degraded"
STOPPED_S = 2.0  # a worker stopped (SIGSTOP) this long is a fault
EXIT_DEGRADED = 3  # `serve --exit-on-degraded`'s exit status once degraded


class Supervisor:
    def __init__(self, coordinator):
        self.c = coordinator
        self.workers: WorkerSet | None = None  # the current pair; set at once by bring_up
        self.io_path = "?"  # the I/O worker's read path (IoReady)
        self.status, self.detail = "starting", ""  # health: starting, ok, restarting, degraded
        self.io_trouble = ""  # why health says degraded while requests are still tried (unit reads)
        self.exit_code = 0  # the process's exit status: 0, or EXIT_DEGRADED (exit_on_degraded)
        self.restarts = 0  # successful replacements since start
        self.failures = 0  # faults and failed attempts in a row, no pass completed between
        self.passes_seen = 0
        self.task: asyncio.Task | None = None
        self.io_failures = 0  # passes in a row failed by a unit that could not be read or verified
        self.stopped_since: dict[int, float] = {}  # worker pid -> when it was first seen stopped

    async def bring_up(self) -> WorkerSet:
        """Spawn and handshake a pair of workers and load the resident units into their arena;
        WorkerStartError (the pair is then stopped) if any of it fails."""
        c = self.c
        workers = WorkerSet(c.config, c.plan.arena_bytes, self.worker_died, *c.targets,
                            resident=c.plan.resident_offsets)
        self.workers = workers  # the coordinator's close() stops them even if start-up is interrupted
        try:
            t0 = asyncio.get_running_loop().time()
            log.info("starting the I/O and compute workers (device %s)", c.config.device)
            ready = await workers.start()
            self.io_path = ready.io_path
            log.info("workers ready in %.1f s (io %s)", asyncio.get_running_loop().time() - t0, self.io_path)
            for ld in StreamSchedule(c.plan).resident_loads():
                await workers.io.send(encode(Load(ld.unit, ld.slot, ld.offset)))
            pending = len(c.plan.resident_offsets)
            progress = LoadProgress(pending, c.plan.resident_bytes)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + c.config.startup_timeout_s
            while pending:  # resident units come first: nothing runs before they are in place
                try:
                    raw = await asyncio.wait_for(workers.io.recv(), 0.5)
                except asyncio.TimeoutError:
                    if workers.dead:
                        raise WorkerStartError(f"the {' and '.join(sorted(workers.dead))} worker "
                                               f"died while the resident units loaded") from None
                    if loop.time() > deadline:
                        raise WorkerStartError(f"resident units not loaded within {c.config.startup_timeout_s:.0f} s "
                                               f"(startup_timeout_s)") from None
                    continue
                msg = decode(raw, max_bytes=None)
                if isinstance(msg, Loaded):
                    if msg.error:
                        raise WorkerStartError(f"loading resident unit {c.plan.names[msg.unit]}: {msg.error}")
                    c.metrics.observe_load(msg.nbytes, msg.seconds, msg.io_path)
                    progress.update(msg.nbytes)
                    pending -= 1
                elif isinstance(msg, WorkerError):
                    raise WorkerStartError(f"io worker: {msg.message}")
            progress.close()
        except BaseException:
            await workers.stop(graceful=False)
            raise
        return workers

    def started(self) -> None:
        """The coordinator serves (its first workers are up): health "ok"."""
        self.status = "ok"

    @property
    def serving(self) -> bool:
        """Workers up and passes running: "ok", or "degraded" by unit reads (requests still tried)."""
        return self.status == "ok" or bool(self.io_trouble)

    @property
    def refusing(self) -> bool:
        """Degraded for good (not by unit reads): every request fails with `worker_died`."""
        return self.status == "degraded" and not self.serving

    async def watchdog(self) -> None:
        """A pass with no worker reply for pass_timeout_s is a fault (code "timeout"), and so is a
        worker stopped for STOPPED_S, pass or no pass."""
        limit = self.c.config.pass_timeout_s
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            b = self.c.batch
            if self.serving and b.in_pass and time.monotonic() - b.last_progress > limit:
                self.fault(f"pass {b.pass_id} made no progress for {limit:g} s (watchdog, "
                           f"--pass-timeout)", "timeout")
            if self.serving:
                self._check_stopped()

    def _check_stopped(self) -> None:
        now = time.monotonic()
        for name, pid in self.workers.pids.items():
            if not _stopped(pid):
                self.stopped_since.pop(pid, None)
                continue
            since = self.stopped_since.setdefault(pid, now)
            if now - since >= STOPPED_S:
                self.stopped_since.clear()
                return self.fault(f"the {name} worker (pid {pid}) is stopped (SIGSTOP?) for "
                                  f"{now - since:.1f} s: no progress is possible (watchdog)", "timeout")

    def pass_outcome(self, error: str | None) -> None:
        """A pass ended: `error` names the unit that failed it (read or checksum), None if it
        completed. Health follows: degraded after IO_FAILURES_DEGRADED failures in a row."""
        if error is None:
            self.io_failures = 0
            if self.io_trouble:
                log.info("a pass completed: serving again (was degraded: %s)", self.io_trouble)
                self.status, self.detail, self.io_trouble = "ok", f"recovered from: {self.detail}", ""
            return
        self.io_failures += 1
        if self.io_failures >= IO_FAILURES_DEGRADED and self.status == "ok":
            self.io_trouble = error
            self.degrade(f"{self.io_failures} passes in a row failed on a unit: {error}")

    def degrade(self, detail: str) -> None:
        """Health says "degraded" with `detail`; with exit_on_degraded the process exits."""
        self.status, self.detail = "degraded", detail
        log.error("service degraded: %s", detail)
        if self.c.config.exit_on_degraded:
            log.error("exiting with status %d (--exit-on-degraded): a service manager may restart it",
                      EXIT_DEGRADED)
            self.exit_code = EXIT_DEGRADED
            self.c.request_stop()

    def worker_died(self, name: str, exitcode) -> None:
        self.fault(f"the {name} worker died (exit code {exitcode})", "worker_died")

    def fault(self, detail: str, code: str) -> None:
        """Fail the running requests now and replace both workers (in the background)."""
        c = self.c
        if not self.serving:
            return  # starting (start() reports it), already restarting, or degraded for good
        self.io_trouble, self.io_failures = "", 0  # fresh workers read afresh
        log.error("%s: failing the running requests and restarting the workers", detail)
        self.status, self.detail = "restarting", detail
        if c.batch.passes_completed > self.passes_seen:
            self.failures = 0  # it served since the last fault: a new incident, not a crash loop
        c.batch.abort_running(code, detail)
        c.stop_worker_loops()
        if self.failures >= c.config.restart_limit:
            self._give_up()
            self.task = asyncio.create_task(self.workers.stop(graceful=False))
        else:
            self.task = asyncio.create_task(self._restart())

    def _give_up(self) -> None:
        c = self.c
        self.degrade(f"gave up after {self.failures} worker restarts in a row (restart_limit "
                     f"{c.config.restart_limit}): {self.detail}")
        c.batch.fail_all("worker_died", self.detail)

    async def _restart(self) -> None:
        c = self.c
        await self.workers.stop(graceful=False)
        while True:
            if self.failures >= c.config.restart_limit:
                return self._give_up()
            self.failures += 1
            await asyncio.sleep(min(BACKOFF_S * 2 ** (self.failures - 1), MAX_BACKOFF_S))
            try:
                workers = await self.bring_up()
            except WorkerStartError as e:
                log.error("restarting the workers failed: %s", e)
                self.detail = f"{self.detail}; restart failed: {e}"
                continue
            break
        self.restarts += 1
        self.passes_seen = c.batch.passes_completed
        c.batch.attach(workers)
        self.status, self.detail = "ok", f"workers restarted after: {self.detail}"
        log.info("workers restarted (%d restarts so far): serving again", self.restarts)
        c.serve_workers()


def _stopped(pid: int) -> bool:
    """True if process `pid` is stopped (SIGSTOP, SIGTSTP) or traced: state T or t in /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:  # gone (its sentinel reports that), or no /proc
        return False
    return stat[stat.rfind(b")") + 2: stat.rfind(b")") + 3] in (b"T", b"t")
