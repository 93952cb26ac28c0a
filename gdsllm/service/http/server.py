"""Serve the HTTP front end (uvicorn) inside the coordinator's asyncio loop: `gdsllm serve
--http-port 8000`.

    run_with_http(config, HttpOptions(host="127.0.0.1", port=8000, api_keys=()))  # until SIGTERM

    server = HttpServer(app, "127.0.0.1", 0)   # binds now: a taken port fails before any loading
    await server.start(); print(server.port); ...; await server.stop()

A non-loopback --http-host needs an API key (or --insecure), as a public ZeroMQ endpoint needs
CurveZMQ keys. Keys come from --api-key-file (one per line, each its own caller), $GDSLLM_API_KEY
or --api-key (which `ps` shows). A connection must send a complete request head within
--http-header-timeout seconds of opening (or of its last answer), or it is closed: idle and slow
sockets do not pile up.

The port is bound before the model loads, so /health answers 503 ("loading") during start-up.
The front end reaches the coordinator through its ZeroMQ endpoint like any client (0.0.0.0 and
* become the loopback address), and records its metrics in the coordinator's registry, so one
/metrics has both.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from gdsllm.config import ServiceConfig

log = logging.getLogger("gdsllm.service.http")
WILDCARDS = ("0.0.0.0", "::", "[::]", "*", "")


@dataclass(frozen=True)
class HttpOptions:
    """The HTTP API's settings (gdsllm serve --http-*): where it binds, the API keys, the Host
    names and Origins it answers besides loopback ones, the request-head deadline, and
    `insecure` (a non-loopback host without a key)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    header_timeout_s: float = 10.0
    insecure: bool = False

    def __post_init__(self):
        from ipc.sockets import is_loopback
        if not self.api_keys and not self.insecure and not is_loopback(f"tcp://{self.host}:0"):
            raise ValueError(f"refusing to serve HTTP on {self.host} without an API key: anyone who "
                             f"can reach it could use the service. Give --api-key-file FILE (or "
                             f"$GDSLLM_API_KEY), bind 127.0.0.1, or pass --insecure")
        if not self.header_timeout_s > 0:
            raise ValueError(f"--http-header-timeout must be positive, got {self.header_timeout_s}")
        bad = [k for k in self.api_keys if not k or not k.isascii() or not k.isprintable() or " " in k]
        if bad:
            raise ValueError("an API key must be printable ASCII without spaces")

    def guard(self):
        """The app's Guard: these keys, and the bound address among the allowed hosts."""
        from gdsllm.service.http.app import Guard
        bound = () if self.host in WILDCARDS else (self.host,)
        return Guard(self.api_keys, bound + self.allowed_hosts, self.allowed_origins)


def read_api_keys(path) -> tuple[str, ...]:
    """The keys of an --api-key-file: one per line; blank lines and # comments skipped."""
    try:
        text = Path(path).expanduser().read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--api-key-file {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    keys = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise ValueError(f"--api-key-file {path}: no key in it (one key per line)")
    return keys


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the coordinator's loop owns SIGINT / SIGTERM
        yield


class HeadDeadline(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for each request's head: from the connection's
    start (or its last answer) it has `header_timeout` seconds to send a complete request line and
    headers, or it is closed. uvicorn alone closes an idle connection only after an answer, so
    a socket that never sends (or sends a byte a minute) was held forever."""

    header_timeout = 10.0
    _head_timer = None
    _head_cycle = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_timer is not None and self.cycle is not self._head_cycle:  # a head arrived
            self._disarm_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is None or self.cycle.response_complete:  # not a pipelined request running
            self._arm_head()

    def connection_lost(self, exc) -> None:
        self._disarm_head()
        super().connection_lost(exc)

    def _arm_head(self) -> None:
        self._disarm_head()
        self._head_cycle = self.cycle
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_expired)

    def _disarm_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()


class HttpServer:
    def __init__(self, app, host: str, port: int, header_timeout_s: float = 10.0):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as e:
            self.sock.close()
            raise OSError(f"cannot serve HTTP on {host}:{port}: {e.strerror or e} (--http-port picks "
                          f"another)") from None
        self.sock.listen(128)
        self.host, self.port = host, self.sock.getsockname()[1]
        protocol = type("HeadDeadline", (HeadDeadline,), {"header_timeout": header_timeout_s})
        self.server = _Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                                             timeout_graceful_shutdown=10, http=protocol))
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started and not self.task.done():
            await asyncio.sleep(0.01)
        if self.task.done():
            self.task.result()

    def stop_accepting(self) -> None:
        """No new connections; the ones in flight finish (uvicorn's graceful shutdown)."""
        self.server.should_exit = True

    async def stop(self) -> None:
        self.stop_accepting()
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.sock.close()


def local_endpoint(endpoint: str) -> str:
    """The address a client on this host connects to for a bound endpoint (tcp://0.0.0.0:5555 ->
    tcp://127.0.0.1:5555)."""
    for any_, local in (("tcp://0.0.0.0:", "tcp://127.0.0.1:"), ("tcp://*:", "tcp://127.0.0.1:"),
                        ("tcp://[::]:", "tcp://[::1]:")):
        if endpoint.startswith(any_):
            return local + endpoint[len(any_):]
    return endpoint


async def _run(config: ServiceConfig, http: HttpOptions) -> int:
    from gdsllm.service.coordinator import Coordinator
    from gdsllm.service.http.app import build_app
    from gdsllm.service.http.frontend import Frontend
    c = Coordinator(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, c.request_stop)
    pair = None
    if config.curve_secret_key is not None:  # the front end is a CurveZMQ client like any other,
        from ipc.sockets import load_secret_key  # with the server's own key pair (--curve-allow
        pair = load_secret_key(config.curve_secret_key)  # lets that one in)
    fe = Frontend(local_endpoint(config.endpoint), metrics=c.metrics, server_key=pair and pair[0],
                  client_keys=pair)
    server = HttpServer(build_app(fe, http.guard(), metrics=c.metrics), http.host, http.port,
                        http.header_timeout_s)
    try:
        await server.start()
        log.info("HTTP API and chat page on http://%s:%d/%s", http.host, server.port,
                 " (API key required)" if http.api_keys else "")
        await c.start()
        await c.serve()
    finally:
        log.info("shutting down")
        server.stop_accepting()  # in-flight requests get the close errors
        await c.close()
        await server.stop()
        await fe.close()
    return c.exit_code


def run_with_http(config: ServiceConfig, http: HttpOptions) -> int:
    """The coordinator and the HTTP front end, until SIGINT/SIGTERM, then a clean shutdown; the
    exit status (gdsllm.service.coordinator.run_coordinator)."""
    import uvloop
    return uvloop.run(_run(config, http))
