"""The HTTP front end's link to the coordinator: one more ZeroMQ client (AsyncClient), shared by
every HTTP request, never a way around the coordinator.

    fe = Frontend("tcp://127.0.0.1:5555")
    model = await fe.ready(req.model)                 # ApiError 503 (loading, degraded) / 404
    final = await fe.run(request, fe.client.generate(prompt, ...))   # ClientGone if it hangs up
    await fe.close()

While the coordinator loads (its socket not bound yet) a health probe times out: that is
"loading", 503. Once it answered "ok", the served model's id is known (the model directory's
name) and requests go straight to it; a degraded service answers them with an Error, 503 here.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from gdsllm.service.client import AsyncClient
from gdsllm.service.http.openai import ApiError, unavailable

PROBE_TIMEOUT = 2.0  # seconds a health probe waits for the coordinator


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


class Frontend:
    def __init__(self, endpoint: str, *, timeout: float = 600.0, metrics=None, server_key=None,
                 client_keys=None):
        # `server_key`: the coordinator's CurveZMQ public key, if it has one; `client_keys`: the
        # (public, secret) pair to connect with (one its --curve-allow list lets in)
        self.endpoint = endpoint
        self.client = AsyncClient(endpoint, timeout=timeout, server_key=server_key,  # replies may be slow
                                  client_keys=client_keys)
        self.probe = AsyncClient(endpoint, timeout=PROBE_TIMEOUT, server_key=server_key,  # health: at once
                                 client_keys=client_keys)
        self.metrics = metrics
        self.model_id: str | None = None
        self.created = 0

    async def close(self) -> None:
        await self.client.close()
        await self.probe.close()

    async def health(self) -> dict:
        """{"status": "ok" | "degraded" | "loading", ...} from the coordinator's HealthReply."""
        try:
            h = await self.probe.health()
        except TimeoutError:
            return {"status": "loading", "detail": f"the coordinator at {self.endpoint} does not "
                                                    f"answer yet (starting up, or not running)"}
        if h.status == "ok" and self.model_id is None:
            self.model_id, self.created = Path(h.model).name or h.model, int(time.time())
        return {"status": h.status, "model": self.model_id or Path(h.model).name, "backend": h.backend,
                "io_path": h.io_path, "requests_running": h.requests_running,
                "requests_waiting": h.requests_waiting, "detail": h.detail}

    async def ready(self, model: str | None = None) -> str:
        """The served model's id once the coordinator serves; ApiError 503 before, 404 if `model`
        names another model."""
        if self.model_id is None:
            h = await self.health()
            if h["status"] != "ok":
                raise unavailable(f"service {h['status']}: {h['detail']}")
        if model is not None and model != self.model_id:
            raise ApiError(404, f"The model '{model}' does not exist (this server serves "
                                f"'{self.model_id}')", param="model", code="model_not_found")
        return self.model_id

    async def serving(self, model: str | None = None) -> str:
        """As `ready`, but asks the coordinator every time: ApiError 503 unless health is "ok" now
        (degraded, restarting, loading), so /v1/models follows /health."""
        h = await self.health()
        if h["status"] != "ok":
            raise unavailable(f"service {h['status']}: {h['detail']}")
        return await self.ready(model)

    async def run(self, request, awaitable):
        """Await `awaitable` (a reply from the coordinator) unless the HTTP client disconnects
        first: then it is cancelled (the AsyncClient sends the coordinator a Cancel) and
        ClientGone is raised."""
        work = asyncio.create_task(_await(awaitable))
        gone = asyncio.create_task(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this handler itself is cancelled
            work.cancel()
            gone.cancel()
            raise
        gone.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            raise ClientGone()
        return work.result()


async def _await(awaitable):
    return await awaitable


async def _disconnected(request) -> None:
    """Return when the ASGI server reports the client gone (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
