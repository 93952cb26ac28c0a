"""Serve the HTTP front end (uvicorn) inside the coordinator's asyncio loop: `gdsllm serve
--http-port 8000`.

    run_with_http(config, HttpOptions(host="127.0.0.1", port=8000, api_key=None))  # until SIGTERM

    server = HttpServer(app, "127.0.0.1", 0)   # binds now: a taken port fails before any loading
    await server.start(); print(server.port); ...; await server.stop()

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

import uvicorn

from gdsllm.config import ServiceConfig

log = logging.getLogger("gdsllm.service.http")


@dataclass(frozen=True)
class HttpOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the coordinator's loop owns SIGINT / SIGTERM
        yield


class HttpServer:
    def __init__(self, app, host: str, port: int):
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
        self.server = _Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                                             timeout_graceful_shutdown=10))
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started and not self.task.done():
            await asyncio.sleep(0.01)
        if self.task.done():
            self.task.result()

    async def stop(self) -> None:
        self.server.should_exit = True
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
    server = HttpServer(build_app(fe, api_key=http.api_key, metrics=c.metrics), http.host, http.port)
    try:
        await server.start()
        log.info("HTTP API and chat page on http://%s:%d/%s", http.host, server.port,
                 " (API key required)" if http.api_key else "")
        await c.start()
        await c.serve()
    finally:
        log.info("shutting down")
        server.server.should_exit = True  # no new connections; in-flight ones get the close errors
        await c.close()
        await server.stop()
        await fe.close()
    return c.exit_code


def run_with_http(config: ServiceConfig, http: HttpOptions) -> int:
    """The coordinator and the HTTP front end, until SIGINT/SIGTERM, then a clean shutdown; the
    exit status (gdsllm.service.coordinator.run_coordinator)."""
    import uvloop
    return uvloop.run(_run(config, http))
