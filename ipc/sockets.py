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

The public socket: `router(ctx, endpoint, max_msg=MAX_FRAME_BYTES, curve=load_secret_key(path))`
drops (disconnects) a peer whose frame exceeds the limit before it is buffered whole (requests
over MAX_REQUEST_BYTES but under that get an error reply from the coordinator), and with a
CurveZMQ key pair only clients given the server's public key (`dealer(..., server_key=pub)`) get
through the handshake. Keys are ZeroMQ certificate files (`gdsllm keygen`).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

import zmq
import zmq.auth
import zmq.utils.z85

from .codec import MAX_REQUEST_BYTES, decode, encode

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


def router(ctx: zmq.Context, endpoint: str, max_msg: int | None = None,
           curve: tuple[bytes, bytes] | None = None) -> zmq.Socket:
    """A bound ROUTER whose sends to an unknown or departed peer raise zmq.ZMQError (EHOSTUNREACH).
    `max_msg`: bytes; a peer sending a larger frame is disconnected (zmq.MAXMSGSIZE). `curve`:
    the server's (public, secret) Z85 key pair; clients must then know the public key."""
    s = _socket(ctx, zmq.ROUTER)
    s.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if max_msg is not None:
        s.setsockopt(zmq.MAXMSGSIZE, max_msg)
    if curve is not None:
        _need_curve()
        s.curve_publickey, s.curve_secretkey = curve
        s.curve_server = True
    return _attach(s, endpoint, bind=True)


def dealer(ctx: zmq.Context, endpoint: str, server_key: bytes | str | None = None,
           client_keys: tuple[bytes, bytes] | None = None) -> zmq.Socket:
    """A connected DEALER; with `server_key` (the server's Z85 public key, or a file holding it)
    the connection is CurveZMQ-encrypted under `client_keys` (public, secret), by default a fresh
    pair (a server with an allow-list of client keys wants a listed one)."""
    s = _socket(ctx, zmq.DEALER)
    # A fixed identity of its own: if the link drops and ZeroMQ reconnects, replies to requests
    # already sent still reach this socket (the ROUTER routes by identity, not by connection).
    s.setsockopt(zmq.ROUTING_ID, b"c" + os.urandom(15))
    if server_key is not None:
        _need_curve()
        s.curve_serverkey = load_public_key(server_key)
        s.curve_publickey, s.curve_secretkey = client_keys or zmq.curve_keypair()
    return _attach(s, endpoint, bind=False)


def _need_curve() -> None:
    if not zmq.has("curve"):
        raise RuntimeError("this pyzmq/libzmq has no CurveZMQ support (built without libsodium)")


def load_secret_key(path) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a ZeroMQ secret certificate file (`gdsllm keygen`)."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable ZeroMQ certificate: {e}") from None
    if secret is None:
        raise ValueError(f"{path}: holds no secret key (give the .key_secret file, not the public "
                         f".key one)")
    return public, secret


def load_allowed_keys(path) -> set[bytes]:
    """The Z85 client public keys in a ZeroMQ certificate file, or in every `*.key` file of a
    directory (`gdsllm keygen` writes them): the clients a CurveZMQ server lets in (`--curve-allow`)."""
    import glob
    path = os.path.expanduser(str(path))
    files = sorted(glob.glob(os.path.join(path, "*.key"))) if os.path.isdir(path) else [path]
    keys = {load_public_key(f) for f in files}
    if not keys:
        raise ValueError(f"{path}: no client public keys (*.key certificates) in this directory")
    return keys


class CurveAllowList:
    """A ZAP handler (ZeroMQ's authentication protocol) on `ctx`: a CurveZMQ server socket made
    afterwards on that context completes the handshake only with clients whose public key is in
    `keys` (Z85 bytes); others get nothing. `stop()` before the context is terminated."""

    def __init__(self, ctx: zmq.Context, keys: set[bytes]):
        from zmq.auth.thread import ThreadAuthenticator
        self.keys = frozenset(keys)
        self.auth = ThreadAuthenticator(zmq.Context.shadow(ctx.underlying))
        self.auth.start()
        self.auth.configure_curve_callback("*", credentials_provider=self)

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys

    def stop(self) -> None:
        self.auth.stop()


def load_public_key(key) -> bytes:
    """A Z85 public key (40 characters), given as the key itself or a certificate file."""
    if isinstance(key, (bytes, str)) and len(key) == 40 and not os.path.exists(str(key)):
        raw = key.encode() if isinstance(key, str) else key
    else:
        try:
            raw, _ = zmq.auth.load_certificate(str(key))
        except (OSError, ValueError) as e:
            raise ValueError(f"{key}: not a Z85 public key nor a ZeroMQ certificate: {e}") from None
    try:
        zmq.utils.z85.decode(raw)
    except Exception:
        raise ValueError(f"server key {raw!r}: not a Z85-encoded 32-byte key") from None
    return raw


def is_loopback(endpoint: str) -> bool:
    """True for ipc:// and inproc:// endpoints and tcp:// ones on a loopback address."""
    import ipaddress
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name, a host name or "*": not provably loopback


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


def recv(sock: zmq.Socket, timeout_s: float, max_bytes: int | None = MAX_REQUEST_BYTES) -> Any:
    """Receive and decode one message; TimeoutError after `timeout_s`, ProtocolError if malformed.
    `max_bytes=None` between the coordinator and its workers (no client limit there)."""
    if not wait(sock, zmq.POLLIN, timeout_s):
        raise TimeoutError(f"no message within {timeout_s:.1f} s")
    return decode(sock.recv(zmq.NOBLOCK), max_bytes)


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
    """A private (mode 0700) temp directory for `ipc://` endpoints, removed with its sockets.

    Its name carries the creating process's pid (`gdsllm-<pid>-xxxx`): a process killed with
    SIGKILL cannot remove it, so each new one first removes this user's dirs whose pid is dead."""

    def __init__(self, prefix: str = "gdsllm-"):
        # /tmp rather than $TMPDIR: ipc:// paths must fit in sockaddr_un (about 107 bytes).
        base = tempfile.gettempdir()
        base = base if len(base) < 40 else "/tmp"
        remove_stale_dirs(base, prefix)
        self.path = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=base)

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


def remove_stale_dirs(base: str, prefix: str = "gdsllm-") -> list[str]:
    """Remove the `<prefix><pid>-*` dirs in `base` that belong to this user and whose process is
    gone (left by a SIGKILL); the removed paths."""
    import re
    removed = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        m = re.fullmatch(re.escape(prefix) + r"(\d+)-\w+", name)
        path = os.path.join(base, name)
        try:
            if not m or os.lstat(path).st_uid != os.getuid() or not os.path.isdir(path):
                continue
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:  # its owner is gone: nobody else removes it
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except (OSError, OverflowError):  # alive under another user, or not ours to judge
            pass
    return removed


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


def fast_exit(code: int = 0) -> None:
    """End this process now, once its own cleanup (sockets, arena, workers) is done: flush logging
    and stdio and skip the interpreter's teardown, which with torch loaded takes a second or more
    on a busy machine (an idle `serve` stopping waited on it three times: both workers, itself)."""
    import logging
    import sys
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(code)
