"""The I/O and compute worker processes, driven over a real PAIR socket as the coordinator would.

Each worker is a real `spawn` process against a tiny model written by gdsllm.writer; the test
plays the coordinator: it binds the socket, receives the handshake and sends Load / Run messages.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from gdsllm.compute_worker import run_compute_process
from gdsllm.config import ServiceConfig
from gdsllm.format import LlamaParams, load_model_meta, unit_layout, unit_tensor_shapes
from gdsllm.io_worker import run_io_process
from gdsllm.writer import ModelWriter
from ipc import sockets
from ipc.arena import Arena, ArenaSpec
from ipc.messages import (ArenaOpened, ComputeReady, Done, IoReady, Load, Loaded, OpenArena,
                          PassResult, Release, Run, SeqSampling, Shutdown, StartPass, WorkerError)

SPAWN = mp.get_context("spawn")
START_S = 120.0  # spawn + importing torch on a loaded 2-core CI machine
REPLY_S = 60.0

PARAMS = LlamaParams(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                     rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False)


def write_model(dst: Path, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    with ModelWriter(dst, PARAMS, "float32", source="test") as w:
        for _, kind, _ in unit_layout(PARAMS):
            w.add_unit({k: torch.randn(s, generator=g) * (1.0 if k.endswith("norm.weight") else 0.1)
                        + (1.0 if k.endswith("norm.weight") else 0.0)
                        for k, s in unit_tensor_shapes(PARAMS, kind).items()})
    return dst


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("workers") / "tiny")


def shm_of(pid: int) -> list[str]:
    """Shared-memory arenas created by process `pid` (other suites run beside this one)."""
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"gdsllm-{pid}-")]


class Peer:
    """A worker process and the coordinator's end of its PAIR socket."""

    def __init__(self, target, args: tuple, endpoint_dir: sockets.EndpointDir, name: str):
        ep = endpoint_dir.endpoint(name)
        self.sock = sockets.pair(sockets.context(), ep, bind=True)
        self.proc = SPAWN.Process(target=target, args=(args[0], ep, *args[1:]), daemon=True)
        self.proc.start()
        self.hello = sockets.recv(self.sock, START_S)

    def send(self, msg) -> None:
        sockets.send(self.sock, msg, REPLY_S)

    def recv(self, timeout_s: float = REPLY_S):
        return sockets.recv(self.sock, timeout_s)

    def close(self) -> int | None:
        if self.proc.is_alive():
            try:
                sockets.send(self.sock, Shutdown(), 2.0)
            except TimeoutError:
                pass  # it is exiting already (after a fatal error) and no longer connected
            self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        self.sock.close()
        return self.proc.exitcode


@pytest.fixture
def edir():
    with sockets.EndpointDir() as d:
        yield d


def load_all(io: Peer, meta, base: int = 0) -> list[int]:
    """Load every unit back to back from `base`; several loads in flight; returns the offsets."""
    offsets, off = [], base
    for u in meta.units:
        offsets.append(off)
        off += u.nbytes
    for u, o in zip(meta.units, offsets):
        io.send(Load(u.index, u.index, o))
    got = [io.recv() for _ in meta.units]
    assert all(isinstance(m, Loaded) and m.error is None for m in got), got
    assert sorted(m.unit for m in got) == list(range(len(meta.units)))
    for m in got:
        assert m.nbytes == meta.units[m.unit].nbytes and m.seconds >= 0 and m.io_path == io.hello.io_path
    return offsets


def arena_size(meta) -> int:
    return sum(u.nbytes for u in meta.units) + 4096


# ---------------------------------------------------------------- the I/O worker


def test_io_worker_loads_land_byte_exact(model, edir):
    meta = load_model_meta(model)
    io = Peer(run_io_process, (ServiceConfig(model=model), arena_size(meta)), edir, "io")
    try:
        ready = io.hello
        assert isinstance(ready, IoReady) and ready.backend == "cpu" and ready.io_path == "posix"
        assert ready.pid == io.proc.pid and ready.arena_bytes == arena_size(meta)
        assert shm_of(ready.pid) == [ready.handle.decode()]
        with Arena.attach(ArenaSpec(ready.backend, ready.handle, ready.arena_bytes)) as arena:
            for rnd in range(2):  # the second round reuses verified units at other offsets
                offsets = load_all(io, meta, base=4096 * rnd)
                for u, o in zip(meta.units, offsets):
                    assert bytes(arena.view(o, u.nbytes).numpy()) == meta.path(u).read_bytes(), u.name
            # bad requests get an error reply naming what is wrong, and the worker keeps going
            io.send(Load(99, 0, 0))
            assert "unit 99 out of range" in io.recv().error
            io.send(Load(1, 0, 100))
            assert "not 4096-aligned" in io.recv().error
            io.send(Load(1, 0, ready.arena_bytes - 4096))
            assert "outside the" in io.recv().error
            io.sock.send(b"\x93garbage")
            err = io.recv()
            assert isinstance(err, WorkerError) and "bad message" in err.message and not err.fatal
            io.send(Run(1, 0, 0))
            assert "unexpected message Run" in io.recv().message
            load_all(io, meta)
    finally:
        assert io.close() == 0
    assert shm_of(io.proc.pid) == []  # the worker unlinked its arena


def test_io_worker_reports_checksum_failure_naming_the_file(tmp_path, edir):
    bad = write_model(tmp_path / "bad", seed=1)
    meta = load_model_meta(bad)
    victim = meta.units[2]
    with open(meta.path(victim), "r+b") as f:  # flip one byte, same size: only the checksum sees it
        f.seek(victim.nbytes // 2)
        b = f.read(1)
        f.seek(victim.nbytes // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    io = Peer(run_io_process, (ServiceConfig(model=bad), arena_size(meta)), edir, "io")
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


def test_io_worker_missing_file_is_a_loaded_error(tmp_path, edir):
    m = write_model(tmp_path / "m", seed=2)
    meta = load_model_meta(m)
    io = Peer(run_io_process, (ServiceConfig(model=m), arena_size(meta)), edir, "io")
    try:
        os.unlink(meta.path(meta.units[1]))
        io.send(Load(1, 0, 0))
        reply = io.recv()
        assert str(meta.path(meta.units[1])) in reply.error and "block.0" in reply.error
    finally:
        assert io.close() == 0


def test_io_worker_require_gds_refuses_to_start_on_cpu(model, edir):
    io = Peer(run_io_process, (ServiceConfig(model=model, require_gds=True), 1 << 20), edir, "io")
    try:
        err = io.hello
        assert isinstance(err, WorkerError) and err.fatal
        assert "--require-gds" in err.message and "'posix'" in err.message
        io.proc.join(30)
        assert io.proc.exitcode == 0
    finally:
        io.close()
    assert shm_of(io.proc.pid) == []


def test_io_worker_bad_model_dir_is_a_fatal_error(tmp_path, edir):
    io = Peer(run_io_process, (ServiceConfig(model=tmp_path / "nothing"), 1 << 20), edir, "io")
    try:
        assert isinstance(io.hello, WorkerError) and io.hello.fatal
        assert "metadata.json" in io.hello.message
    finally:
        io.close()


def _cached_bytes(path: Path) -> int:
    if shutil.which("fincore"):
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                             check=True, capture_output=True, text=True).stdout
        return int(out.split()[0])
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # writable view for ctypes; no page touched
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        addr = ctypes.c_void_p.from_buffer(m)  # noqa: the mapping's address
        rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(addr)), ctypes.c_size_t(size), vec)
        del addr
        m.close()
        assert rc == 0, os.strerror(ctypes.get_errno())
        return sum(v & 1 for v in vec) * mmap.PAGESIZE


def _drop_cache(meta) -> None:
    for u in meta.units:
        fd = os.open(meta.path(u), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


@pytest.mark.parametrize("io_mode", ["direct", "buffered"])
def test_direct_loads_leave_no_page_cache(tmp_path, edir, io_mode):
    m = write_model(tmp_path / "m", seed=3)
    meta = load_model_meta(m)
    _drop_cache(meta)
    assert sum(_cached_bytes(meta.path(u)) for u in meta.units) == 0
    io = Peer(run_io_process, (ServiceConfig(model=m, io_mode=io_mode), arena_size(meta)), edir, "io")
    try:
        assert io.hello.io_path == ("posix" if io_mode == "direct" else "buffered")
        load_all(io, meta)
        load_all(io, meta)
    finally:
        assert io.close() == 0
    cached = sum(_cached_bytes(meta.path(u)) for u in meta.units)
    if io_mode == "direct":
        assert cached == 0
    else:  # the control: buffered reads do fill the page cache, so the measurement can see it
        assert cached > 0


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
def test_worker_exits_when_its_parent_dies(model, edir, which):
    ep = edir.endpoint(which)
    sock = sockets.pair(sockets.context(), ep, bind=True)
    cfg = ServiceConfig(model=model)
    args = (cfg, ep, 1 << 20) if which == "io" else (cfg, ep)
    target = run_io_process if which == "io" else run_compute_process
    middle = SPAWN.Process(target=_middle_parent, args=(target, args))
    middle.start()
    try:
        hello = sockets.recv(sock, START_S)
        assert isinstance(hello, IoReady if which == "io" else ComputeReady)
        if which == "io":
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
    assert shm_of(hello.pid) == []  # the orphaned I/O worker still unlinked its arena


# ---------------------------------------------------------------- the compute worker


def reference_tokens(meta, prompts: dict[int, list[int]], sampling: dict[int, SeqSampling],
                     steps: int) -> dict[int, list[int]]:
    """The same generation in this process: Runner over the unit files, one Sampler per sequence."""
    from gdsllm.bridge import unit_tensors
    from gdsllm.runner import Runner
    from gdsllm.sampling import Sampler, SamplingParams
    from gdsllm.storage import HostReader, aligned_host_buffer

    bufs = []
    with HostReader() as r:
        for u in meta.units:
            bufs.append(aligned_host_buffer(u.nbytes))
            r.read(meta.path(u), bufs[-1], u.nbytes)
    runner = Runner(meta.params, "cpu", torch.float32)
    samplers = {sid: Sampler(SamplingParams(temperature=s.temperature, top_p=s.top_p,
                                            top_k=s.top_k, seed=s.seed)) for sid, s in sampling.items()}
    out = {sid: [] for sid in prompts}
    chunks = list(prompts.items())
    for _ in range(steps):
        runner.start_pass(chunks)
        for u, b in zip(meta.units, bufs):
            runner.run_unit(u, unit_tensors(u, b))
        logits = runner.end_pass()
        picks = Sampler.sample_batch(logits, [samplers[sid] for sid, _ in chunks])
        chunks = []
        for (sid, _), t in zip(list(out.items()), picks):
            out[sid].append(t)
            chunks.append((sid, [t]))
    return out


class Pipeline:
    """The test as coordinator: embed and head resident, blocks streamed through 2 slots."""

    def __init__(self, model: Path, edir, device: str = "cpu"):
        self.meta = meta = load_model_meta(model)
        self.resident = {0: 0, len(meta.units) - 1: meta.units[0].nbytes}
        base = meta.units[0].nbytes + meta.units[-1].nbytes
        slot = max(u.nbytes for u in meta.units)
        self.slots = [base, base + slot]
        cfg = ServiceConfig(model=model, device=device, prefetch_window=2)
        self.io = Peer(run_io_process, (cfg, base + 2 * slot), edir, "io")
        self.compute = Peer(run_compute_process, (cfg,), edir, "compute")
        assert isinstance(self.io.hello, IoReady), self.io.hello
        assert isinstance(self.compute.hello, ComputeReady), self.compute.hello
        assert self.compute.hello.device.split(":")[0] == device
        r = self.io.hello
        self.compute.send(OpenArena(r.backend, r.handle, r.arena_bytes))
        assert self.compute.recv() == ArenaOpened(r.arena_bytes)
        for unit, off in self.resident.items():
            self.io.send(Load(unit, -1, off))
        assert all(self.io.recv().error is None for _ in self.resident)
        self.pass_id = 0

    def run_pass(self, chunks, sampling, units=None) -> list:
        """One weight pass; returns every compute reply after StartPass, in order."""
        self.pass_id += 1
        self.compute.send(StartPass(self.pass_id, chunks, sampling))
        replies = []
        for i, u in enumerate(units if units is not None else range(len(self.meta.units))):
            if u in self.resident:
                slot, off = -1, self.resident[u]
            else:
                slot = i % 2
                off = self.slots[slot]
                self.io.send(Load(u, slot, off))
                assert self.io.recv().error is None
            self.compute.send(Run(u, slot, off))
            while True:  # until this unit's Done: the slot is free again only then
                m = self.compute.recv()
                replies.append(m)
                if isinstance(m, Done):
                    assert (m.unit, m.slot) == (u, slot)
                    break
        if units is None and not any(isinstance(m, WorkerError) for m in replies):
            replies.append(self.compute.recv())
        return replies

    def generate(self, prompts, sampling, steps) -> dict[int, list[int]]:
        out = {sid: [] for sid in prompts}
        chunks, new = list(prompts.items()), dict(sampling)
        for _ in range(steps):
            replies = self.run_pass(chunks, new)
            new = {}
            result = replies[-1]
            assert isinstance(result, PassResult) and result.pass_id == self.pass_id, replies
            assert all(isinstance(m, Done) for m in replies[:-1])
            assert result.seconds >= 0 and [s for s, _ in result.tokens] == [s for s, _ in chunks]
            for sid, t in result.tokens:
                out[sid].append(t)
            chunks = [(sid, [t]) for sid, t in result.tokens]
        return out

    def close(self) -> None:
        assert self.compute.close() == 0
        assert self.io.close() == 0


@pytest.fixture
def pipeline(model, edir):
    p = Pipeline(model, edir)
    yield p
    p.close()


def test_compute_worker_matches_runner_in_process(pipeline):
    prompts = {1: [3, 14, 15, 92, 65], 2: [7], 5: [2, 71, 82, 81, 82, 84, 59, 0]}
    sampling = {1: SeqSampling(0.0, 1.0, 0, None), 2: SeqSampling(0.9, 0.95, 20, 1234),
                5: SeqSampling(1.3, 1.0, 0, 99)}
    got = pipeline.generate(prompts, sampling, steps=6)
    assert got == reference_tokens(pipeline.meta, prompts, sampling, steps=6)
    pipeline.compute.send(Release([1, 2, 5]))
    # released sequences start over: the same ids and prompts give the same tokens again
    assert pipeline.generate(prompts, sampling, steps=6) == got


def test_compute_worker_reports_a_failing_step_and_keeps_serving(pipeline):
    meta, greedy = pipeline.meta, {1: SeqSampling(0.0, 1.0, 0, None)}
    pipeline.compute.send(Run(0, -1, 0))  # no pass yet
    assert "outside a pass" in pipeline.compute.recv().message
    assert pipeline.compute.recv() == Done(0, -1, 0.0)
    # block.1 before block.0: the Runner refuses; the error names the pass and the unit
    replies = pipeline.run_pass([(1, [5, 6])], greedy, units=[0, 2, 1, 3])
    assert isinstance(replies[0], Done) and replies[0].unit == 0 and replies[0].seconds > 0
    err = replies[1]
    assert isinstance(err, WorkerError) and not err.fatal
    assert (err.pass_id, err.unit) == (pipeline.pass_id, 2)
    assert f"pass {pipeline.pass_id}" in err.message and "block.1" in err.message
    # the failed pass's units are all acknowledged (slots free), nothing else is computed
    assert [(m.unit, m.seconds) for m in replies[2:]] == [(2, 0.0), (1, 0.0), (3, 0.0)]
    # bad sampling values and unknown sequences fail the StartPass, not the worker
    replies = pipeline.run_pass([(2, [1])], {2: SeqSampling(0.5, 2.0, 0, None)}, units=[0])
    assert isinstance(replies[0], WorkerError) and "top_p" in replies[0].message
    replies = pipeline.run_pass([(3, [1])], {}, units=[0])
    assert "sequences [3] have no sampling parameters" in replies[0].message
    replies = pipeline.run_pass([(4, [meta.params.vocab_size])], {4: greedy[1]}, units=[0])
    assert "outside the vocabulary" in replies[0].message
    pipeline.compute.sock.send(b"\xc1")
    assert "bad message" in pipeline.compute.recv().message
    # and the next good pass is served correctly
    pipeline.compute.send(Release([1, 2, 3, 4]))
    prompts = {1: [5, 6]}
    assert pipeline.generate(prompts, greedy, 3) == reference_tokens(meta, prompts, greedy, 3)


def test_compute_worker_without_an_arena(model, edir):
    c = Peer(run_compute_process, (ServiceConfig(model=model),), edir, "compute")
    try:
        c.send(StartPass(1, [(1, [2])], {1: SeqSampling(0.0, 1.0, 0, None)}))
        c.send(Run(0, 0, 0))
        err = c.recv()
        assert isinstance(err, WorkerError) and "no arena is open" in err.message and err.unit == 0
        assert c.recv() == Done(0, 0, 0.0)
        c.send(OpenArena("cpu", b"gdsllm-no-such-arena", 4096))
        err = c.recv()
        assert isinstance(err, WorkerError) and err.fatal and "cannot open" in err.message
        c.proc.join(30)
        assert c.proc.exitcode == 0
    finally:
        c.close()


@pytest.mark.gpu
def test_cuda_pipeline_matches_the_cpu_reference(model, edir):
    """KvikIO into the CUDA IPC arena, compute on the GPU: the CPU reference's greedy tokens."""
    pytest.importorskip("cupy", reason="the CUDA arena needs CuPy: pip install 'gdsllm[cuda]'")
    p = Pipeline(model, edir, device="cuda")
    try:
        assert p.io.hello.backend == "cuda" and len(p.io.hello.handle) == 64
        assert p.io.hello.io_path in ("gds", "compat", "posix")
        prompts = {1: [3, 14, 15, 92, 65], 2: [7, 8]}
        greedy = {1: SeqSampling(0.0, 1.0, 0, None), 2: SeqSampling(0.0, 1.0, 0, None)}
        assert p.generate(prompts, greedy, 5) == reference_tokens(p.meta, prompts, greedy, 5)
    finally:
        p.close()


def test_io_worker_ignores_sigint_and_cleans_up_on_sigterm(model, edir):
    meta = load_model_meta(model)
    io = Peer(run_io_process, (ServiceConfig(model=model), arena_size(meta)), edir, "io")
    try:
        os.kill(io.proc.pid, signal.SIGINT)  # Ctrl-C hits the whole group: the coordinator decides
        load_all(io, meta)
        assert shm_of(io.proc.pid) == [io.hello.handle.decode()]
        os.kill(io.proc.pid, signal.SIGTERM)
        io.proc.join(30)
        assert io.proc.exitcode == 128 + signal.SIGTERM
    finally:
        io.close()
    assert shm_of(io.proc.pid) == []
