"""The I/O worker process, and how both workers end, driven over a real PAIR socket.

Each worker is a real `spawn` process against a tiny model written by gdsllm.convert.writer; the test
plays the coordinator: it binds the socket, receives the handshake and sends Load messages. For the
I/O worker alone, the test also plays the compute worker: it owns the arena (Arena.create) and
checks the bytes that land in it.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from gdsllm.service.benchmark import cached_bytes
from gdsllm.service.compute_worker import run_compute_process
from gdsllm.config import ServiceConfig
from gdsllm.format.metadata import load_model_meta
from gdsllm.service.io_worker import run_io_process
from gdsllm.format.storage import probe_io_path
from ipc import sockets
from ipc.arena import Arena
from ipc.messages import (AttachArena, ComputeReady, IoReady, Load, Loaded, MakeRunner, Run, RunnerReady,
                          WorkerError)
from workerkit import (SPAWN, START_S, Peer, arena, arena_of, arena_size, edir, load_all, model,  # noqa: F401
                       shm_of, write_model)


# ---------------------------------------------------------------- the I/O worker


def test_io_worker_loads_land_byte_exact(model, edir):
    meta = load_model_meta(model)
    arena = Arena.create("cpu", arena_size(meta))  # the test owns it, as the compute worker would
    io = Peer(run_io_process, (ServiceConfig(model=model),), edir, "io", arena=arena.spec)
    try:
        ready = io.hello
        assert isinstance(ready, IoReady) and ready.io_path == "posix" and ready.pid == io.proc.pid
        assert shm_of(ready.pid) == []  # it opened ours, made none
        for rnd in range(2):  # the second round reuses verified units at other offsets
            offsets = load_all(io, meta, base=4096 * rnd)
            for u, o in zip(meta.units, offsets):
                assert bytes(arena.view(o, u.nbytes).numpy()) == meta.path(u).read_bytes(), u.name
        # bad requests get an error reply naming what is wrong, and the worker keeps going
        io.send(Load(99, 0, 0))
        assert "unit 99 out of range" in io.recv().error
        io.send(Load(1, 0, 100))
        assert "not 4096-aligned" in io.recv().error
        io.send(Load(1, 0, arena.spec.nbytes - 4096))
        assert "outside the" in io.recv().error
        io.send(AttachArena("cpu", arena.spec.handle, arena.spec.nbytes))
        assert "already open" in io.recv().message
        io.sock.send(b"\x93garbage")
        err = io.recv()
        assert isinstance(err, WorkerError) and "bad message" in err.message and not err.fatal
        io.send(Run(1, 0, 0))
        assert "unexpected message Run" in io.recv().message
        load_all(io, meta)
    finally:
        assert io.close() == 0
        arena.close()


def test_io_worker_refuses_loads_before_its_arena_and_a_bad_arena(model, edir):
    io = Peer(run_io_process, (ServiceConfig(model=model),), edir, "io", hello=False)
    try:
        io.send(Load(1, 0, 0))  # its first reply: nothing is said before AttachArena
        assert "no arena is open (AttachArena first)" in io.recv(START_S).error
        io.send(AttachArena("cpu", b"gdsllm-no-such-arena", 4096))
        err = io.recv()
        assert isinstance(err, WorkerError) and err.fatal and "cannot open the arena" in err.message
        io.proc.join(30)
        assert io.proc.exitcode == 0
    finally:
        io.close()


def test_io_worker_reports_checksum_failure_naming_the_file(tmp_path, edir, arena):
    bad = write_model(tmp_path / "bad", seed=1)
    meta = load_model_meta(bad)
    victim = meta.units[2]
    with open(meta.path(victim), "r+b") as f:  # flip one byte, same size: only the checksum sees it
        f.seek(victim.nbytes // 2)
        b = f.read(1)
        f.seek(victim.nbytes // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    io = Peer(run_io_process, (ServiceConfig(model=bad),), edir, "io", arena=arena.spec)
    try:
        for attempt in range(2):  # a corrupt unit is never marked verified: it fails every time
            io.send(Load(victim.index, 0, 0))
            reply = io.recv()
            assert isinstance(reply, Loaded) and reply.unit == victim.index
            assert reply.error is not None and str(meta.path(victim)) in reply.error
            assert "checksum" in reply.error and victim.name in reply.error
        io.send(Load(1, 0, 0))  # the good units still load
        assert io.recv().error is None
    finally:
        assert io.close() == 0


def test_io_worker_missing_file_is_a_loaded_error(tmp_path, edir, arena):
    m = write_model(tmp_path / "m", seed=2)
    meta = load_model_meta(m)
    io = Peer(run_io_process, (ServiceConfig(model=m),), edir, "io", arena=arena.spec)
    try:
        os.unlink(meta.path(meta.units[1]))
        io.send(Load(1, 0, 0))
        reply = io.recv()
        assert str(meta.path(meta.units[1])) in reply.error and "block.0" in reply.error
    finally:
        assert io.close() == 0


def test_io_worker_require_gds_refuses_to_start_on_cpu(model, edir):
    io = Peer(run_io_process, (ServiceConfig(model=model, require_gds=True),), edir, "io")
    try:
        err = io.hello
        assert isinstance(err, WorkerError) and err.fatal
        assert "--require-gds" in err.message and "'posix'" in err.message
        io.proc.join(30)
        assert io.proc.exitcode == 0
    finally:
        io.close()


def test_io_worker_bad_model_dir_is_a_fatal_error(tmp_path, edir):
    io = Peer(run_io_process, (ServiceConfig(model=tmp_path / "nothing"),), edir, "io")
    try:
        assert isinstance(io.hello, WorkerError) and io.hello.fatal
        assert "metadata.json" in io.hello.message
    finally:
        io.close()


def _drop_cache(meta) -> None:
    for u in meta.units:
        fd = os.open(meta.path(u), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


@pytest.mark.parametrize("device, io_mode", [
    ("cpu", "direct"), ("cpu", "buffered"),
    pytest.param("cuda", "direct", marks=pytest.mark.gpu), pytest.param("cuda", "buffered", marks=pytest.mark.gpu),
])
def test_direct_loads_leave_no_page_cache(tmp_path, edir, device, io_mode):
    if device == "cuda":
        pytest.importorskip("cupy", reason="the CUDA arena needs CuPy: pip install 'gdsllm[cuda]'")
    m = write_model(tmp_path / "m", seed=3)
    meta = load_model_meta(m)
    _drop_cache(meta)
    assert sum(cached_bytes(meta.path(u)) for u in meta.units) == 0
    cfg = ServiceConfig(model=m, device=device, io_mode=io_mode)
    with Arena.create(device, arena_size(meta)) as owned:  # on CUDA, opened over CUDA IPC
        io = Peer(run_io_process, (cfg,), edir, "io", arena=owned.spec)
        try:
            assert isinstance(io.hello, IoReady), io.hello
            if io_mode == "buffered":
                assert io.hello.io_path == "buffered"
            else:
                assert io.hello.io_path == ("posix" if device == "cpu" else probe_io_path("cuda"))
            load_all(io, meta)
            load_all(io, meta)
        finally:
            assert io.close() == 0
    cached = sum(cached_bytes(meta.path(u)) for u in meta.units)
    if io_mode == "direct":
        assert cached == 0
    elif device == "cpu" or probe_io_path("cuda") != "gds":  # (real GDS bypasses the cache anyway)
        assert cached > 0  # the control: buffered reads do fill it, so the measurement can see it


# ---------------------------------------------------------------- lifecycle


def _middle_parent(target, args) -> None:
    """A stand-in coordinator: starts the worker, then waits to be killed."""
    SPAWN.Process(target=target, args=args).start()
    time.sleep(600)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line for line in f)
    except FileNotFoundError:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("which", ["io", "compute"])
def test_worker_exits_when_its_parent_dies(model, edir, arena, which):
    ep = edir.endpoint(which)
    sock = sockets.pair(sockets.context(), ep, bind=True)
    cfg = ServiceConfig(model=model)
    args = (cfg, ep) if which == "io" else (cfg, ep, 1 << 20)
    target = run_io_process if which == "io" else run_compute_process
    middle = SPAWN.Process(target=_middle_parent, args=(target, args))
    middle.start()
    try:
        if which == "io":
            s = arena.spec
            sockets.send(sock, AttachArena(s.backend, s.handle, s.nbytes), START_S)
        hello = sockets.recv(sock, START_S)
        assert isinstance(hello, IoReady if which == "io" else ComputeReady)
        if which == "compute":
            assert shm_of(hello.pid) == [hello.handle.decode()]
        os.kill(middle.pid, signal.SIGKILL)
        middle.join(10)
        deadline = sockets.Deadline(60)
        while not _gone(hello.pid) and not deadline.expired:
            time.sleep(0.1)
        assert _gone(hello.pid), f"worker {hello.pid} outlived its parent"
    finally:
        if middle.is_alive():
            middle.kill()
        sock.close()
    assert shm_of(hello.pid) == []  # the orphaned compute worker still unlinked its arena


def test_io_worker_ignores_sigint_and_exits_on_sigterm(model, edir, arena):
    meta = load_model_meta(model)
    io = Peer(run_io_process, (ServiceConfig(model=model),), edir, "io", arena=arena.spec)
    try:
        os.kill(io.proc.pid, signal.SIGINT)  # Ctrl-C hits the whole group: the coordinator decides
        load_all(io, meta)
        os.kill(io.proc.pid, signal.SIGTERM)
        io.proc.join(30)
        assert io.proc.exitcode == 128 + signal.SIGTERM
    finally:
        io.close()
    assert os.path.exists(f"/dev/shm/{arena.spec.handle.decode()}")  # only mapped it: ours stays


def test_compute_worker_owns_the_arena_until_sigterm(model, edir):
    """The compute worker allocates the arena (a segment named after its pid), survives
    SIGINT with it, and unlinks it on SIGTERM."""
    c = Peer(run_compute_process, (ServiceConfig(model=model), 1 << 20), edir, "compute")
    try:
        ready = c.hello
        assert isinstance(ready, ComputeReady) and ready.pid == c.proc.pid, ready
        assert ready.backend == "cpu" and ready.arena_bytes == 1 << 20
        assert shm_of(ready.pid) == [ready.handle.decode()]
        with Arena.attach(arena_of(ready)) as peer:  # what the I/O worker will open
            peer.view(4096, 4).copy_(torch.tensor([1, 2, 3, 4], dtype=torch.uint8))
            os.kill(c.proc.pid, signal.SIGINT)
            c.send(MakeRunner({}))
            assert isinstance(c.recv(), RunnerReady)  # still serving, after SIGINT
            os.kill(c.proc.pid, signal.SIGTERM)
            c.proc.join(30)
            assert c.proc.exitcode == 128 + signal.SIGTERM
            assert shm_of(ready.pid) == []  # unlinked by its owner while still mapped here
            assert peer.view(4096, 4).tolist() == [1, 2, 3, 4]
    finally:
        c.close()


def test_compute_worker_that_cannot_allocate_its_arena_is_a_fatal_error(model, edir):
    c = Peer(run_compute_process, (ServiceConfig(model=model), 0), edir, "compute")
    try:
        assert isinstance(c.hello, WorkerError) and c.hello.fatal
        assert "arena size must be positive" in c.hello.message
        c.proc.join(30)
        assert c.proc.exitcode == 0
    finally:
        c.close()
    assert shm_of(c.proc.pid) == []


def test_a_compute_worker_killed_before_its_ready_leaves_no_arena(model):
    """The arena's owner dying between making it and announcing it: the start fails naming the
    compute worker, and stopping the set unlinks the segment it left (found by its pid)."""
    import asyncio
    from gdsllm.service.worker_set import WorkerSet, WorkerStartError
    from workerkit import compute_dies_after_its_arena

    async def start_and_stop() -> int:
        ws = WorkerSet(ServiceConfig(model=model), 1 << 20, compute_target=compute_dies_after_its_arena)
        try:
            with pytest.raises(WorkerStartError, match="compute worker"):
                await ws.start()
            pid = ws.pids["compute"]
            for _ in range(100):  # the segment exists once the child got that far
                if shm_of(pid):
                    break
                await asyncio.sleep(0.05)
            assert shm_of(pid), "the fake compute worker made no arena"
        finally:
            await ws.stop(graceful=False)
        return pid

    assert shm_of(asyncio.run(start_and_stop())) == []
