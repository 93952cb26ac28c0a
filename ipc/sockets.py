"""ZeroMQ helpers: sockets that never hang, waits that always have a deadline.

    ctx = context()
    with EndpointDir() as d:                          # private 0700 temp dir, removed on exit
        a = pair(ctx, d.endpoint("io"), bind=True)    # the coordinator binds ...
        b = pair(ctx, d.endpoint("io"), bind=False)   # ... each worker connects
        send(b, IoReady(...), timeout_s=5)
        msg = recv(a, timeout_s=5)                    # a typed message, ProtocolError, or TimeoutError

Every socket has LINGER 0 (closing never blocks on undelivered messages), every send and receive
polls with a deadline first, and ROUTER sockets set ROUTER_MANDATORY so a reply to a vanished
peer raises instead of being dropped silently.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

import zmq

from .codec import decode, encode

MAX_IPC_PATH = 100  # bytes; sockaddr_un holds about 107, leave room for the "ipc://" prefix


def context() -> zmq.Context:
    """The process-wide ZeroMQ context (one per process; spawn children get their own)."""
    return zmq.Context.instance()


def _socket(ctx: zmq.Context, kind: int) -> zmq.Socket:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)  # never block close() or process exit on unsent messages
    return s


def _attach(s: zmq.Socket, endpoint: str, bind: bool) -> zmq.Socket:
    """Bind or connect `s`; on failure close it (an open socket would hang `ctx.term()`) and raise
    OSError naming the endpoint (`tcp://127.0.0.1:5555: Address already in use`)."""
    try:
        (s.bind if bind else s.connect)(endpoint)
    except zmq.ZMQError as e:
        s.close(linger=0)
        raise OSError(e.errno, f"{endpoint}: {e.strerror}") from None
    return s


def pair(ctx: zmq.Context, endpoint: str, bind: bool) -> zmq.Socket:
    """A PAIR socket, bound (coordinator side) or connected (worker side) to `endpoint`."""
    return _attach(_socket(ctx, zmq.PAIR), endpoint, bind)


def router(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    """A bound ROUTER whose sends to an unknown or departed peer raise zmq.ZMQError (EHOSTUNREACH)."""
    s = _socket(ctx, zmq.ROUTER)
    s.setsockopt(zmq.ROUTER_MANDATORY, 1)
    return _attach(s, endpoint, bind=True)


def dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    return _attach(_socket(ctx, zmq.DEALER), endpoint, bind=False)


def wait(sock: zmq.Socket, event: int, timeout_s: float) -> bool:
    """True once `sock` is ready for `event` (zmq.POLLIN / POLLOUT), False after `timeout_s`."""
    return bool(sock.poll(max(0, int(timeout_s * 1000)), event))


def send(sock: zmq.Socket, msg: Any, timeout_s: float) -> None:
    """Encode and send one message; TimeoutError if the peer cannot take it within `timeout_s`."""
    send_raw(sock, encode(msg), timeout_s)


def send_raw(sock: zmq.Socket, raw: bytes, timeout_s: float) -> None:
    if not wait(sock, zmq.POLLOUT, timeout_s):
        raise TimeoutError(f"send timed out after {timeout_s:.1f} s (peer gone or not reading)")
    sock.send(raw, zmq.NOBLOCK)


def recv(sock: zmq.Socket, timeout_s: float) -> Any:
    """Receive and decode one message; TimeoutError after `timeout_s`, ProtocolError if malformed."""
    if not wait(sock, zmq.POLLIN, timeout_s):
        raise TimeoutError(f"no message within {timeout_s:.1f} s")
    return decode(sock.recv(zmq.NOBLOCK))


class Deadline:
    """`Deadline(5.0).left()` -> seconds remaining (never negative); `.expired`."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.end


class EndpointDir:
    """A private (mode 0700) temp directory for `ipc://` endpoints, removed with its sockets."""

    def __init__(self, prefix: str = "gdsllm-"):
        # /tmp rather than $TMPDIR: ipc:// paths must fit in sockaddr_un (about 107 bytes).
        base = tempfile.gettempdir()
        self.path = tempfile.mkdtemp(prefix=prefix, dir=base if len(base) < 40 else "/tmp")

    def endpoint(self, name: str) -> str:
        path = os.path.join(self.path, f"{name}.sock")
        assert len(path) <= MAX_IPC_PATH, f"ipc path too long for a unix socket: {path}"
        return f"ipc://{path}"

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> "EndpointDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ParentWatch:
    """`alive()` is False once the process that started this one is gone (checked by pid, so a
    worker whose coordinator was killed exits instead of lingering with its shm or VRAM)."""

    def __init__(self):
        import multiprocessing
        parent = multiprocessing.parent_process()
        self.ppid = parent.pid if parent is not None else os.getppid()

    def alive(self) -> bool:
        return os.getppid() == self.ppid


def worker_signals() -> None:
    """For worker processes: Ctrl-C (sent to the whole process group) is the coordinator's to
    handle, it then sends Shutdown; SIGTERM exits through `finally` blocks, so arenas are freed."""
    import signal

    def _term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _term)
