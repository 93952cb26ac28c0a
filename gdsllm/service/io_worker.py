"""The I/O worker process: fills the compute worker's slot arena from storage as the coordinator says.

    ctx = multiprocessing.get_context("spawn")          # CUDA needs spawn
    p = ctx.Process(target=run_io_process, args=(config, endpoint), daemon=True)

`run_io_process(config: ServiceConfig, endpoint: str) -> None` connects a PAIR socket to
`endpoint` (the coordinator binds it), loads the model's metadata and opens its reader; a failure
there (bad model, `require_gds` without GDS) is `WorkerError(fatal=True)`, sent unasked. Then
`AttachArena(backend, handle, arena_bytes)` (the arena the compute worker allocated and owns:
POSIX shm on "cpu", a CUDA IPC handle on "cuda"): the worker opens it and replies
`IoReady(pid, io_path)`, or `WorkerError(fatal=True)`. Then, until `Shutdown` or the parent's
death: each `Load(unit, slot, offset)` reads unit file `unit` into the arena at byte `offset`,
several at once, and is answered by `Loaded(unit, slot, nbytes, seconds, io_path)`; `seconds` is
the read alone. Reads go through gdsllm.engine.loader (as gdsllm.LLM's do). A read that fails
(OSError: EIO, a vanished or short file) is retried `config.read_retries` times with back-off
before it counts. The first load of each unit (`--verify first`) or every load (`--verify
always`) is checksummed where it landed; a mismatch (or a read that kept failing) is
`Loaded(..., error=...)` naming the file. Replies come in completion order, not request order.
It only maps the arena: on exit it closes its mapping, and the compute worker frees it.
Messages from the coordinator are internal: no client size limit.
"""
from __future__ import annotations

import os
import queue
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import zmq

from ipc import sockets
from ipc.arena import Arena, ArenaSpec
from ipc.messages import (AttachArena, IoReady, Load, Loaded, ProtocolError, Shutdown, WorkerError,
                          decode)

from gdsllm.config import ServiceConfig
from gdsllm.engine.loader import UnitLoader
from gdsllm.format.metadata import ALIGN, load_model_meta
from gdsllm.service.threads import set_threads

POLL_S = 0.5  # how often an idle worker checks that its parent is alive
SEND_TIMEOUT_S = 30.0  # a coordinator that takes no reply for this long is gone
FLUSH_MS = 2000  # bounded wait at exit for queued replies (the socket default is LINGER 0)
RETRY_S = 0.1  # first back-off of a failed read; doubled on each retry


def run_io_process(config: ServiceConfig, endpoint: str) -> None:
    """Entry point of the I/O worker process (see the module docstring). Returns on Shutdown,
    when the parent process dies, or after a fatal error it has reported."""
    sockets.worker_signals()
    set_threads("io")
    IoWorker(config, endpoint).run()
    sockets.fast_exit()  # its cleanup is done: skip the slow interpreter teardown


class IoWorker:
    def __init__(self, config: ServiceConfig, endpoint: str):
        self.config, self.endpoint = config, endpoint
        self.parent = sockets.ParentWatch()
        self.sock = sockets.pair(sockets.context(), endpoint, bind=False)
        self.arena: Arena | None = None
        self.loader: UnitLoader | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.done: queue.SimpleQueue[Loaded] = queue.SimpleQueue()
        # Read threads wake the zmq poll through this pipe: zmq sockets must stay in one thread.
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)  # a full pipe already means "wake up": never block

    def run(self) -> None:
        try:
            try:
                self._start()
            except Exception as e:
                self._send(WorkerError(f"I/O worker failed to start: {e}", fatal=True))
                return
            self._loop()
        except TimeoutError:
            pass  # the coordinator stopped reading: it is gone, so are we
        finally:
            self._close()

    # ------------------------------------------------------------------ start-up

    def _start(self) -> None:
        cfg = self.config
        self.meta = load_model_meta(cfg.model)
        self.loader = UnitLoader(self.meta, cfg.device, cfg.io_mode == "direct", cfg.io_threads)
        self.io_path = self.loader.io_path
        if cfg.require_gds and self.io_path != "gds":
            raise RuntimeError(f"--require-gds: reads would take the {self.io_path!r} path, not "
                               f"'gds' (no GPUDirect Storage: device {cfg.device}, io {cfg.io_mode}, "
                               f"nvidia-fs and a supported filesystem are needed)")
        # A few whole-unit loads at once; each is itself split into parallel chunk reads. A
        # mixture of experts reads many small units (one expert: a few MiB, one chunk): enough
        # at once to keep the reader's `io_threads` busy (with 2, the first MoE run on the H200
        # read experts at a queue depth of 2).
        moe = 2 * cfg.io_threads if self.meta.params.num_experts else 0
        self.pool = ThreadPoolExecutor(max_workers=max(2, cfg.prefetch_window, moe),
                                       thread_name_prefix="gdsllm-load")

    def _attach(self, msg: AttachArena) -> bool:
        """Open the compute worker's arena and say IoReady; False (after a fatal WorkerError) if
        it cannot be opened."""
        if self.arena is not None:
            self._send(WorkerError("I/O worker: the arena is already open"))
            return True
        try:
            self.arena = Arena.attach(ArenaSpec(msg.backend, msg.handle, msg.arena_bytes, msg.device))
        except Exception as e:
            self._send(WorkerError(f"I/O worker cannot open the arena: {e}", fatal=True))
            return False
        self._send(IoReady(pid=os.getpid(), io_path=self.io_path))
        return True

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.wake_r, zmq.POLLIN)
        while True:
            events = dict(poller.poll(int(POLL_S * 1000)))
            if not self.parent.alive():
                return
            if self.wake_r in events:
                os.read(self.wake_r, 4096)
            self._publish()
            if self.sock in events:
                while self.sock.poll(0, zmq.POLLIN):
                    if not self._handle(self.sock.recv(zmq.NOBLOCK)):
                        return

    def _handle(self, raw: bytes) -> bool:
        """Act on one message; False on Shutdown."""
        try:
            msg = decode(raw, max_bytes=None)
        except ProtocolError as e:
            self._send(WorkerError(f"I/O worker: bad message: {e}"))
            return True
        if isinstance(msg, Shutdown):
            return False
        if isinstance(msg, AttachArena):
            return self._attach(msg)
        if not isinstance(msg, Load):
            self._send(WorkerError(f"I/O worker: unexpected message {type(msg).__name__}"))
            return True
        error = self._check(msg)
        if error:
            self._send(Loaded(msg.unit, msg.slot, 0, 0.0, self.io_path, error=error))
        else:
            self.pool.submit(self._load, msg)
        return True

    def _check(self, msg: Load) -> str | None:
        if self.arena is None:
            return "no arena is open (AttachArena first)"
        n = len(self.meta.units)
        if not 0 <= msg.unit < n:
            return f"unit {msg.unit} out of range: the model has {n} units"
        unit = self.meta.units[msg.unit]
        size = self.arena.spec.nbytes
        if msg.offset % ALIGN or msg.offset < 0 or msg.offset + unit.nbytes > size:
            return (f"unit {unit.name}: arena bytes [{msg.offset}, {msg.offset + unit.nbytes}) are not "
                    f"{ALIGN}-aligned or fall outside the {size}-byte arena")
        return None

    def _publish(self) -> None:
        while True:
            try:
                reply = self.done.get_nowait()
            except queue.Empty:
                return
            self._send(reply)

    # ------------------------------------------------------------------ one load (a pool thread)

    def _load(self, msg: Load) -> None:
        unit = self.meta.units[msg.unit]
        path = self.meta.path(unit)
        try:
            seconds = self._load_retrying(unit, msg)
            reply = Loaded(msg.unit, msg.slot, unit.nbytes, seconds, self.io_path)
        except Exception as e:
            text = str(e) if str(path) in str(e) else f"{path}: {e}"
            reply = Loaded(msg.unit, msg.slot, 0, 0.0, self.io_path,
                           error=f"unit {unit.name}: {type(e).__name__}: {text}")
        self.done.put(reply)
        try:
            os.write(self.wake_w, b"x")
        except BlockingIOError:
            pass

    def _load_retrying(self, unit, msg: Load) -> float:
        for attempt in range(self.config.read_retries + 1):
            if self.config.verify == "always":
                self.loader.verified.discard(unit.index)  # checksummed again, on every load
            try:
                return self.loader.load(unit, self.arena.view(msg.offset, unit.nbytes),
                                        self.arena.read_target(msg.offset, unit.nbytes))
            except OSError as e:  # a checksum mismatch is a FormatError: not retried
                if attempt == self.config.read_retries:
                    raise
                delay = RETRY_S * 2 ** attempt
                print(f"gdsllm io worker: reading {self.meta.path(unit)} failed ({e}); retrying in "
                      f"{delay:.2f} s", file=sys.stderr, flush=True)
                time.sleep(delay)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ shutdown

    def _send(self, msg) -> None:
        sockets.send(self.sock, msg, SEND_TIMEOUT_S)

    def _close(self) -> None:
        if self.pool is not None:
            # Reads in flight write into the arena: finish them before it is unmapped.
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.loader is not None:
            self.loader.close()
        if self.arena is not None:
            self.arena.close()
        self.sock.close(linger=FLUSH_MS)  # a last WorkerError must reach the coordinator
        sockets.context().term()  # returns once queued replies are out (or FLUSH_MS passed)
        os.close(self.wake_r)
        os.close(self.wake_w)
