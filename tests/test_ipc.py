"""The wire protocol, the socket helpers and the shared-memory arena, over real sockets and shm."""
from __future__ import annotations

import multiprocessing as mp
import os

import msgpack
import re

import pytest
import torch
import zmq

from ipc import sockets
from ipc.arena import Arena, ArenaError, ArenaSpec
from ipc.codec import MAX_REQUEST_BYTES
from ipc.messages import (AttachArena, Cancel, ChatMessage, ComputeReady, Done, Error, Final,
                          Generate, Health, HealthReply, IoReady, Load, Loaded, MakeRunner,
                          PassResult, RunnerReady, ProtocolError, Run, SeqSampling, Shutdown,
                          StartPass, TokenChunk, WorkerError, decode, encode)

SAMPLES = [
    Generate("r1", prompt="hello", max_tokens=5, seed=3, stop=["\n"]),
    Generate("r2", messages=[ChatMessage("user", "hi")], stream=False),
    Cancel("r1"), Health(),
    TokenChunk("r1", "lo", [5, 6]),
    Final("r1", "hello", [1, 2], "stop", 3, 2, 0.01, 0.5),
    Error("r1", "bad_request", "no"),
    HealthReply("h", "ok", "m", "cpu", "posix", 100, ["embed", "head"], 3, 2, 1, 0),
    ComputeReady(8, "cpu", "cpu", b"gdsllm-8-ab", 8192), AttachArena("cpu", b"gdsllm-8-ab", 8192),
    AttachArena("cuda", b"\x01" * 64, 1 << 30, 1), IoReady(7, "posix"),
    MakeRunner({0: 0, 4: 4096}), RunnerReady(), RunnerReady(1 << 30, 4096, 16),
    Load(3, 1, 4096), Loaded(3, 1, 4096, 0.5, "posix"), Loaded(3, 1, 0, 0.0, "posix", error="x"),
    StartPass(1, [(1, [5, 6, 7]), (2, [9])], {1: SeqSampling(0.0, 1.0, 0, None),
                                             2: SeqSampling(0.7, 0.9, 40, 5)}),
    StartPass(2, [(1, [8])], {}, tables={3: [4, 5]}, released=[2], runs=[(0, -1, 0, 5)]),
    StartPass(3, [(1, []), (4, [])], {}, released=[2], runs=[(0, -1, 0, 5)], follows=2),
    Run(3, 1, 4096), Done(3, 1, 0.25), PassResult(1, {1: [8], 2: [3, 10]}, 0.3, {2: 1}),
    WorkerError("boom"), WorkerError("pass 3 failed", pass_id=3, unit=2),
    Shutdown(),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    assert decode(encode(msg)) == msg


def _raw(**d) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


@pytest.mark.parametrize("raw, words", [
    (b"\xc1\xff garbage", "not a msgpack message"),
    (b"", "not a msgpack message"),
    (msgpack.packb([1, 2, 3]), "must be a msgpack map"),
    (_raw(type="launch_missiles"), "unknown message type 'launch_missiles'"),
    (_raw(type=5, unit=1), "unknown message type 5"),
    (_raw(unit=1, slot=0, offset=0), "unknown message type None"),
    (_raw(type="load", unit="3", slot=0, offset=0), "load.unit: expected an integer, got str"),
    (_raw(type="load", unit=True, slot=0, offset=0), "load.unit: expected an integer, got bool"),
    (_raw(type="load", unit=1.5, slot=0, offset=0), "load.unit: expected an integer"),
    (_raw(type="load", unit=1, slot=0), "load: missing field 'offset'"),
    (_raw(type="load", unit=1, slot=0, offset=0, evil=1), "unknown field(s) ['evil']"),
    (_raw(type="compute_ready", pid=1, device="cpu", backend="cpu", handle="str", arena_bytes=1),
     "compute_ready.handle: expected bytes, got str"),
    (_raw(type="compute_ready", pid=1, device="cpu", backend="tpu", handle=b"x", arena_bytes=1),
     "unknown arena backend 'tpu'"),
    (_raw(type="attach_arena", backend="cpu", handle=b"", arena_bytes=1), "arena handle is empty"),
    (_raw(type="attach_arena", backend="cpu", handle=b"x", arena_bytes=0), "arena_bytes must be positive"),
    (_raw(type="attach_arena", backend="cuda", handle=b"x", arena_bytes=1, device=-1), "device index"),
    (_raw(type="io_ready", pid=1), "io_ready: missing field 'io_path'"),
    (_raw(type="make_runner", resident={"0": 0}), "make_runner.resident"),
    (_raw(type="start_pass", pass_id=1, chunks=[[1, [2, "x"]]], sampling={}),
     "start_pass.chunks[0][1][1]: expected an integer"),
    (_raw(type="start_pass", pass_id=1, chunks=[[1]], sampling={}), "expected 2 items, got 1"),
    (_raw(type="start_pass", pass_id=1, chunks=[], sampling={1: {"temperature": 1.0}}),
     "missing 3 required"),
    (_raw(type="start_pass", pass_id=1, chunks=[], sampling=[1]), "expected a map"),
    (_raw(type="start_pass", pass_id=1, chunks=[], sampling={}, released=5),
     "start_pass.released: expected a list"),
    (_raw(type="generate", request_id="r", prompt="a", messages=[]), "exactly one of"),
    (_raw(type="generate", request_id="", prompt="a"), "request_id must be"),
    (_raw(type="generate", request_id="r", prompt="a", max_tokens=None), "expected an integer"),
    (_raw(type="generate", request_id="r", prompt="a", caller=""), "caller must be 1 to 128"),
    (_raw(type="generate", request_id="r", prompt="a", caller="c" * 129), "caller must be 1 to 128"),
    (_raw(type="health", request_id="x" * 129), "request_id must be 1 to 128"),  # echoed back
    (_raw(type="cancel", request_id="x" * 129), "request_id must be 1 to 128"),
    (b"\x00" * (MAX_REQUEST_BYTES + 1), "exceeds the"),
], ids=lambda v: v[:24].hex() if isinstance(v, bytes) else None)
def test_malformed_input_raises_protocol_error(raw, words):
    with pytest.raises(ProtocolError) as e:
        decode(raw)
    assert words in str(e.value)


def _start(**kw) -> bytes:
    return _raw(**{"type": "start_pass", "pass_id": 5, "chunks": [[1, []]], "sampling": {},
                   "partial": [], "draft": {}, "tables": {}, "released": [], "runs": [],
                   "follows": 4, **kw})


@pytest.mark.parametrize("raw,words", [
    (_start(follows=None, chunks=[[1, [3]], [2, []]]), "an empty chunk outside a pass scheduled ahead"),
    (_start(follows=3), "follows pass 3, not the one before it"),
    (_start(chunks=[[1, [3]]]), "one empty (placeholder) chunk per sequence"),
    (_start(chunks=[]), "one empty (placeholder) chunk per sequence"),
    (_start(tables={1: [2]}), "no new sequences, partial chunks or drafts"),
    (_start(draft={1: 2}), "no new sequences, partial chunks or drafts"),
], ids=["empty-chunk", "follows-gap", "token-in-placeholder", "no-chunks", "tables", "draft"])
def test_a_pass_scheduled_ahead_is_validated(raw, words):
    with pytest.raises(ProtocolError, match=re.escape(words)):
        decode(raw, max_bytes=None)


def test_oversized_valid_message_is_refused():
    big = encode(Generate("r", prompt="x" * MAX_REQUEST_BYTES))
    with pytest.raises(ProtocolError, match="exceeds the"):
        decode(big)


# ---------------------------------------------------------------- sockets


def test_pair_send_recv_and_deadlines():
    ctx = sockets.context()
    with sockets.EndpointDir() as d:
        ep = d.endpoint("t")
        assert ep.startswith("ipc://") and os.stat(d.path).st_mode & 0o777 == 0o700
        a, b = sockets.pair(ctx, ep, bind=True), sockets.pair(ctx, ep, bind=False)
        try:
            sockets.send(b, Load(1, 0, 0), timeout_s=2)
            assert sockets.recv(a, timeout_s=2) == Load(1, 0, 0)
            with pytest.raises(TimeoutError):
                sockets.recv(a, timeout_s=0.05)
            b.send(b"garbage")
            with pytest.raises(ProtocolError):
                sockets.recv(a, timeout_s=2)
        finally:
            a.close(), b.close()
    assert not os.path.exists(d.path)


def test_send_to_absent_peer_times_out_instead_of_hanging():
    with sockets.EndpointDir() as d:
        a = sockets.pair(sockets.context(), d.endpoint("lonely"), bind=True)
        try:
            with pytest.raises(TimeoutError):
                sockets.send(a, Shutdown(), timeout_s=0.1)
        finally:
            a.close()


def test_router_mandatory_raises_for_a_vanished_peer():
    ctx = sockets.context()
    with sockets.EndpointDir() as d:
        r = sockets.router(ctx, d.endpoint("front"))
        c = sockets.dealer(ctx, d.endpoint("front"))
        try:
            sockets.send(c, Health(), timeout_s=2)
            assert sockets.wait(r, zmq.POLLIN, 2)
            ident, raw = r.recv_multipart()
            assert decode(raw) == Health()
            r.send_multipart([ident, encode(Health())])
            assert sockets.recv(c, 2) == Health()
            with pytest.raises(zmq.ZMQError) as e:
                r.send_multipart([b"nobody", encode(Health())])
            assert e.value.errno == zmq.EHOSTUNREACH
        finally:
            r.close(), c.close()


# ---------------------------------------------------------------- the shared-memory arena


def _shm_entries() -> set[str]:
    """This process's arenas (other suites may create theirs meanwhile)."""
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"gdsllm-{os.getpid()}-")}


def _child_fill(spec_fields, offset, n, value):
    with Arena.attach(ArenaSpec(*spec_fields)) as a:
        a.view(offset, n).fill_(value)


def test_shm_arena_shared_across_processes_and_unlinked():
    before = _shm_entries()
    with Arena.create("cpu", 3 * 4096 + 100) as arena:
        spec = arena.spec
        assert spec.backend == "cpu" and spec.nbytes == 3 * 4096 + 100
        name = spec.handle.decode()
        assert name in _shm_entries()
        assert arena.tensor.data_ptr() % 4096 == 0  # page aligned: O_DIRECT can read into it
        p = mp.get_context("spawn").Process(target=_child_fill, args=(
            (spec.backend, spec.handle, spec.nbytes), 4096, 4096, 7))
        p.start()
        p.join(60)
        assert p.exitcode == 0
        t = arena.tensor
        assert int(t[:4096].sum()) == 0 and bool((t[4096:8192] == 7).all()) and int(t[8192:].sum()) == 0
        with pytest.raises(ValueError, match="outside the"):
            arena.view(3 * 4096, 4096)
    assert _shm_entries() == before
    with pytest.raises(ArenaError, match="cannot open shared-memory arena"):
        Arena.attach(spec)


def test_arena_close_with_live_views_still_unlinks():
    arena = Arena.create("cpu", 8192)
    view = arena.view(0, 4096)
    view.fill_(1)
    name = arena.spec.handle.decode()
    arena.close()
    arena.close()  # idempotent
    assert name not in _shm_entries()
    del view


@pytest.mark.parametrize("spec, words", [
    (ArenaSpec("cpu", b"gdsllm-no-such-arena", 4096), "cannot open"),
    (ArenaSpec("cpu", b"../etc/passwd", 4096), "bad shared-memory arena name"),
    (ArenaSpec("cpu", b"\xff\xfe", 4096), "is not a name"),
])
def test_attach_bad_handle(spec, words):
    with pytest.raises(ArenaError, match=words):
        Arena.attach(spec)


def test_attach_refuses_a_smaller_arena_than_announced():
    with Arena.create("cpu", 4096) as arena:
        with pytest.raises(ArenaError, match="expected"):
            Arena.attach(ArenaSpec("cpu", arena.spec.handle, 1 << 20))


def test_arena_spec_validation():
    with pytest.raises(ArenaError, match="unknown arena backend"):
        ArenaSpec("tpu", b"x", 10)
    with pytest.raises(ArenaError, match="positive"):
        ArenaSpec("cpu", b"x", 0)


def _child_fill_cuda(spec_fields):
    with Arena.attach(ArenaSpec(*spec_fields)) as a:
        a.view(4096, 4096).fill_(9)
        torch.cuda.synchronize()


@pytest.mark.gpu
def test_cuda_arena_ipc_between_processes():
    with Arena.create("cuda", 1 << 20) as arena:
        assert arena.tensor.is_cuda and len(arena.spec.handle) == 64
        p = mp.get_context("spawn").Process(target=_child_fill_cuda, args=(
            (arena.spec.backend, arena.spec.handle, arena.spec.nbytes),))
        p.start()
        p.join(120)
        assert p.exitcode == 0
        t = arena.tensor
        assert int(t[:4096].sum()) == 0 and bool((t[4096:8192] == 9).all())
        target = arena.read_target(0, 4096)
        assert hasattr(target, "__cuda_array_interface__")
