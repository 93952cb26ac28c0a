"""The coordinator's two worker processes: spawned, handshaken with a deadline, watched, stopped.

    workers = WorkerSet(config, arena_bytes, on_death=callback)
    io_ready = await workers.start()            # IoReady (its io path) or WorkerStartError
    await workers.io.send(encode(Load(...)))    # zmq.asyncio PAIR sockets: .io and .compute
    await workers.stop()                        # Shutdown, join, kill after a deadline, unlink shm
    await workers.stop(graceful=False)          # SIGKILL both at once (a replaced, faulty pair)

Start-up (both spawned at once: each imports torch): the compute worker allocates the slot arena
of `arena_bytes` and owns it (ComputeReady: its handle), the I/O worker opens it (AttachArena ->
IoReady), then the compute worker makes its Runner, KV cache sized in the memory left
(MakeRunner -> RunnerReady); every step has the `startup_timeout_s` deadline. Stopping reverses
the ownership: the I/O worker, which maps the arena, before the compute worker, which frees it.

Each worker gets one PAIR socket over `ipc://` in a private temp dir (the coordinator binds). A
worker that exits unexpectedly is noticed through its process sentinel (an fd the event loop
watches), and `on_death(name, exitcode)` is called once; the coordinator then replaces the whole
set (gdsllm.service.coordinator). Messages from the workers are internal: no client size limit.
Processes use the "spawn" context: CUDA cannot survive fork.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os

import zmq
import zmq.asyncio

from ipc import sockets
from ipc.worker_messages import shm_names
from ipc.messages import (AttachArena, ComputeReady, IoReady, MakeRunner, ProtocolError, RunnerReady,
                          Shutdown, WorkerError, decode, encode)

log = logging.getLogger("gdsllm.workers")
STOP_TIMEOUT_S = 10.0  # a worker told to Shutdown that has not exited by then is killed
LAST_WORDS_S = 0.5  # how long a worker that exited during start-up may take to deliver its WorkerError


class WorkerStartError(RuntimeError):
    """A worker did not start: it reported an error, died, or missed the handshake deadline."""


class WorkerSet:
    def __init__(self, config, arena_bytes: int, on_death=None, io_target=None, compute_target=None,
                 resident: dict[int, int] | None = None):
        self.config, self.arena_bytes, self.on_death = config, arena_bytes, on_death
        self.resident = dict(resident or {})  # unit -> arena offset, for the compute worker to pin
        if io_target is None:
            from gdsllm.service.io_worker import run_io_process as io_target
        if compute_target is None:
            from gdsllm.service.compute_worker import run_compute_process as compute_target
        self.targets = {"io": io_target, "compute": compute_target}
        self.ctx = zmq.asyncio.Context()
        self.ctx.setsockopt(zmq.LINGER, 0)
        self.dir = sockets.EndpointDir()
        self.procs: dict[str, multiprocessing.Process] = {}
        self.io = sockets.pair(self.ctx, self.dir.endpoint("io"), bind=True)
        self.compute = sockets.pair(self.ctx, self.dir.endpoint("compute"), bind=True)
        for sock in (self.io, self.compute):
            # Never let a send wait (the coordinator sends without awaiting, in order, from its
            # single event loop); a pass start may carry many MiB of prompt token ids.
            sock.setsockopt(zmq.SNDHWM, 0)
        self.shm_name: str | None = None  # the compute worker's /dev/shm arena (device "cpu")
        self.stopping = self.closed = False
        self.free_bytes: int | None = None  # device memory left after the arena and KV cache (RunnerReady)
        self.opened: RunnerReady | None = None  # the compute worker's KV cache size
        self._dead: set[str] = set()
        self._ready: set[str] = set()  # workers whose handshake completed (they read Shutdown)

    @property
    def dead(self) -> set[str]:
        """Names of the workers that exited."""
        return set(self._dead)

    @property
    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def _spawn(self, name: str, *args) -> None:
        mp = multiprocessing.get_context("spawn")
        p = mp.Process(target=self.targets[name], args=(self.config, *args),
                       name=f"gdsllm-{name}", daemon=True)
        p.start()
        self.procs[name] = p
        asyncio.get_running_loop().add_reader(p.sentinel, self._sentinel, name)

    def _sentinel(self, name: str) -> None:
        p = self.procs[name]
        asyncio.get_running_loop().remove_reader(p.sentinel)
        p.join(1)  # the sentinel fired: it has exited, reap it for its exit code
        self._dead.add(name)
        if not self.stopping:
            log.error("%s worker (pid %s) died with exit code %s", name, p.pid, p.exitcode)
            if self.on_death is not None:
                self.on_death(name, p.exitcode)

    async def _handshake(self, name: str, sock, expect: type, request=None):
        """Send `request` (if any), then the worker's next message, both within the config's
        `startup_timeout_s`, while watching that both workers stay alive."""
        deadline = asyncio.get_running_loop().time() + self.config.startup_timeout_s
        if request is not None:  # waits while the worker has not connected yet (still importing)
            await self._watch(name, asyncio.ensure_future(sock.send(encode(request))), False, deadline)
        msg = decode(await self._watch(name, asyncio.ensure_future(sock.recv()), True, deadline),
                     max_bytes=None)
        if isinstance(msg, WorkerError):
            raise WorkerStartError(f"{name} worker: {msg.message}")
        if not isinstance(msg, expect):
            raise WorkerStartError(f"{name} worker sent {type(msg).__name__} instead of {expect.__name__}")
        self._ready.add(name)
        return msg

    async def _watch(self, name: str, fut: asyncio.Future, receiving: bool, deadline: float):
        """`fut`'s result (a send to or a receive from worker `name`); WorkerStartError when a
        worker exits first or `deadline` (loop time) passes."""
        loop = asyncio.get_running_loop()
        try:
            while not fut.done():
                await asyncio.wait([fut], timeout=0.1)
                if fut.done():
                    break  # its message (a WorkerError says why it exits) wins over its exit
                gone = [other for other, p in self.procs.items() if other in self._dead or not p.is_alive()]
                if receiving and name in gone:
                    await asyncio.wait([fut], timeout=LAST_WORDS_S)  # its WorkerError may be on its way
                    if fut.done():
                        break
                if gone:  # its socket is free to read unless this is a receive from it
                    listen = not (receiving and gone[0] == name)
                    raise WorkerStartError(await self._exit_reason(gone[0], listen))
                if loop.time() > deadline:
                    raise WorkerStartError(f"{name} worker did not report ready within "
                                           f"{self.config.startup_timeout_s:.0f} s (startup_timeout_s)")
            return fut.result()
        finally:
            fut.cancel()

    async def _exit_reason(self, name: str, listen: bool) -> str:
        """Why worker `name` exited during start-up: the WorkerError it sent first (a bad model,
        --require-gds: it may fail while the other one's handshake is awaited), else its exit code.
        `listen`: no handshake is reading its socket, so look there."""
        sock = self.io if name == "io" else self.compute
        if listen:
            try:
                if await sock.poll(int(LAST_WORDS_S * 1000), zmq.POLLIN):
                    msg = decode(await sock.recv(), max_bytes=None)
                    if isinstance(msg, WorkerError):
                        return f"{name} worker: {msg.message}"
            except (zmq.ZMQError, ProtocolError):
                pass  # no last words: its exit code says what there is to say
        return f"{name} worker exited during start-up (exit code {self.procs[name].exitcode})"

    async def start(self) -> IoReady:
        """Spawn both workers (they import torch in parallel), then handshake: ComputeReady (the
        compute worker's arena), AttachArena -> IoReady, MakeRunner -> RunnerReady. Raises
        WorkerStartError; the caller then calls stop()."""
        self._spawn("compute", self.dir.endpoint("compute"), self.arena_bytes)
        self._spawn("io", self.dir.endpoint("io"))
        ready = await self._handshake("compute", self.compute, ComputeReady)
        if ready.backend == "cpu":
            self.shm_name = ready.handle.decode(errors="replace")
        if ready.arena_bytes < self.arena_bytes:
            raise WorkerStartError(f"compute worker made a {ready.arena_bytes}-byte arena, "
                                   f"{self.arena_bytes} were asked for")
        device = int(ready.device.partition(":")[2] or 0)  # "cuda:1" -> 1; "cpu" -> 0
        io_ready = await self._handshake("io", self.io, IoReady,
                                         AttachArena(ready.backend, ready.handle, ready.arena_bytes, device))
        opened = await self._handshake("compute", self.compute, RunnerReady, MakeRunner(self.resident))
        self.free_bytes, self.opened = opened.free_bytes, opened
        return io_ready

    async def _tell_stop(self, name: str, sock) -> None:
        """Shutdown to a worker (SIGTERM to one still starting: it would read no message)."""
        p = self.procs.get(name)
        if p is not None and name not in self._ready and p.is_alive():
            log.info("stopping the %s worker during its start-up", name)
            p.terminate()  # SIGTERM: it exits through its `finally` blocks (worker_signals)
            return
        try:
            await asyncio.wait_for(sock.send(encode(Shutdown())), 1.0)
        except (zmq.ZMQError, asyncio.TimeoutError):
            pass  # the peer is gone or never connected

    async def stop(self, graceful: bool = True) -> None:
        """Tell both workers to Shutdown (SIGTERM to one still starting: it would read no message),
        join them, kill what is left after STOP_TIMEOUT_S, and remove the sockets and any
        shared-memory arena a killed compute worker (its owner) left behind. `graceful=False`: kill both at once
        (workers being replaced after a fault). Idempotent."""
        if self.closed:
            return
        self.closed = self.stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (STOP_TIMEOUT_S if graceful else 0.0)
        # On CUDA, the I/O worker first: it has the compute worker's arena open over CUDA IPC,
        # and the exporter must not free that memory while another process still maps it. A CPU
        # arena is shared memory, which outlives its unlinking while mapped: both are told at
        # once (an idle stop takes half).
        order = (("io", self.io), ("compute", self.compute))
        owner = self.procs.get("compute")
        owner_pid = owner.pid if owner is not None else None
        together = graceful and self.config.device == "cpu"
        if together:
            for name, sock in order:
                await self._tell_stop(name, sock)
        for name, sock in order:
            p = self.procs.get(name)
            if graceful and not together:
                await self._tell_stop(name, sock)
            if p is None:
                continue
            while p.is_alive() and loop.time() < deadline:
                await asyncio.sleep(0.05)
            if p.is_alive():
                if graceful:
                    log.warning("%s worker (pid %s) ignored Shutdown; killing it", name, p.pid)
                p.kill()
            p.join(5)
            try:
                loop.remove_reader(p.sentinel)
            except (ValueError, OSError):
                pass
            p.close()
        self.procs.clear()
        # The compute worker's arena: the one it announced, or, killed before its ComputeReady
        # was read, any it had made (named after its pid).
        left = [self.shm_name] if self.shm_name else (
            shm_names(owner_pid) if owner_pid is not None and self.config.device == "cpu" else [])
        for name in left:
            if not os.path.exists(f"/dev/shm/{name}"):
                continue
            # Expected after a kill (graceful=False: start-up failures, faults); a warning when a
            # worker that was asked to shut down left it.
            log.log(logging.WARNING if graceful else logging.INFO,
                    "unlinking the shared-memory arena /dev/shm/%s left by the compute worker", name)
            try:
                os.unlink(f"/dev/shm/{name}")
            except OSError:
                pass
            forget_shared_memory(name)
        self.io.close(linger=0)
        self.compute.close(linger=0)
        self.ctx.term()
        self.dir.close()


def forget_shared_memory(name: str) -> None:
    """Tell multiprocessing's resource tracker (one per process tree: the spawned workers
    registered the arena with ours) that a segment is gone, unlinked here rather than by its
    owner; otherwise it warns about a "leaked" segment, then fails to unlink it, at exit."""
    from multiprocessing import resource_tracker
    try:
        resource_tracker.unregister(f"/{name}", "shared_memory")
    except Exception:  # no tracker running (nothing was registered): nothing to forget
        pass
