"""The OpenAI-compatible HTTP API and the chat page, as an ASGI application (Starlette).

    app = build_app(Frontend("tcp://127.0.0.1:5555"), api_key="sekrit", metrics=service_metrics)
    # GET /  (chat page)   GET /health   GET /v1/models   POST /v1/completions
    # POST /v1/chat/completions  (stream: server-sent events, then `data: [DONE]`)

Why Starlette (served by uvicorn): it is the layer vLLM's FastAPI sits on, without FastAPI's
pydantic models (the request rules live in gdsllm.service.http.openai, one place, as everywhere
in GdsLLM); it runs in the coordinator's own asyncio loop next to the ZeroMQ sockets; its
StreamingResponse watches for the client's disconnect while streaming, which is what cancels a
request whose reader left. aiohttp would do too, but it brings its own HTTP stack and handler
model for no gain here.

Every error is OpenAI's JSON error shape with its status: 400 bad request, 401 missing or wrong
key (when `api_key` is set; /v1/* only: the page and /health stay open), 404 unknown model or
route, 429 the coordinator's queue is full (its `busy`), 503 loading or degraded.
"""
from __future__ import annotations

import hmac
import json
import time
import uuid
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ipc.messages import Final, TokenChunk

from gdsllm.service.client import ServiceError
from gdsllm.service.http import openai, sse
from gdsllm.service.http.frontend import ClientGone, Frontend
from gdsllm.service.http.openai import ApiError

STATIC = Path(__file__).resolve().parent / "static"
ROUTES = ("/", "/static", "/health", "/v1/models", "/v1/completions", "/v1/chat/completions")


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


def _reply_error(e: Exception) -> ApiError:
    if isinstance(e, ServiceError):
        return openai.service_error(e)
    return openai.unavailable(str(e))  # TimeoutError: the coordinator stopped answering


async def _body(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise openai.bad(f"We could not parse the JSON body of your request ({e})") from None


def build_app(fe: Frontend, *, api_key: str | None = None, metrics=None) -> Starlette:
    async def health(request: Request) -> Response:
        h = await fe.health()
        return JSONResponse(h, status_code=200 if h["status"] == "ok" else 503)

    async def models(request: Request) -> Response:
        model = await fe.serving()  # 503 while /health is not ok: a load balancer may probe either
        return JSONResponse({"object": "list", "data": [_model(model)]})

    async def model(request: Request) -> Response:
        await fe.serving(request.path_params["model"])
        return JSONResponse(_model(fe.model_id))

    def _model(name: str) -> dict:
        return {"id": name, "object": "model", "created": fe.created, "owned_by": "gdsllm"}

    async def completions(request: Request) -> Response:
        return await _generate(request, chat=False)

    async def chat(request: Request) -> Response:
        return await _generate(request, chat=True)

    async def _generate(request: Request, chat: bool) -> Response:
        req = openai.parse_request(await _body(request), chat)
        model = await fe.ready(req.model)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        args = dict(messages=req.messages, request_id=rid, **req.params)
        try:
            if not req.stream:
                final = await fe.run(request, fe.client.generate(req.prompt, **args))
                return JSONResponse(openai.completion_body(req, rid, model, created, final))
            replies = fe.client.stream_messages(req.prompt, **args)
            # The first reply before the headers: a refused request still gets its status code.
            first = await fe.run(request, replies.__anext__())
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; counted as nginx counts it
        except (ServiceError, TimeoutError) as e:
            raise _reply_error(e) from None
        return StreamingResponse(_events(req, rid, model, created, first, replies),
                                 media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    app = Starlette(routes=[
        Route("/", page), Route("/health", health), Route("/v1/models", models),
        Route("/v1/models/{model:path}", model), Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static")],
        exception_handlers={ApiError: _api_error, HTTPException: _http_error,
                            Exception: _internal_error})
    return Observed(KeyCheck(app, api_key), metrics)


async def _events(req, rid: str, model: str, created: int, msg, replies):
    """The SSE body: chunks as the coordinator's TokenChunks arrive, the finish, the usage, [DONE].
    Cancelled (the client left) inside `replies`, whose AsyncClient then cancels the request."""
    try:
        if req.chat:
            yield sse.event(openai.chunk_body(req, rid, model, created, role=True))
        while True:
            if isinstance(msg, TokenChunk):
                if msg.text:
                    yield sse.event(openai.chunk_body(req, rid, model, created, text=msg.text))
            elif isinstance(msg, Final):
                yield sse.event(openai.chunk_body(req, rid, model, created,
                                                  finish=openai.finish_reason(msg.finish_reason)))
                if req.include_usage:
                    yield sse.event(openai.usage_chunk(req, rid, model, created, msg))
                break
            msg = await replies.__anext__()
    except (ServiceError, TimeoutError) as e:  # after the headers: an error event, as OpenAI does
        yield sse.event(_reply_error(e).body())
    finally:
        await replies.aclose()
    yield sse.DONE


async def _api_error(request: Request, e: ApiError) -> Response:
    return error_response(e)


async def _http_error(request: Request, e: HTTPException) -> Response:
    if e.status_code == 404:
        err = ApiError(404, f"Invalid URL ({request.method} {request.url.path})", code="not_found")
    elif e.status_code == 405:
        err = ApiError(405, f"Method {request.method} not allowed on {request.url.path}")
    else:
        err = ApiError(e.status_code, str(e.detail))
    return error_response(err)


async def _internal_error(request: Request, e: Exception) -> Response:
    return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))


class KeyCheck:
    """ASGI middleware: /v1/* needs `Authorization: Bearer <api_key>` when a key is set."""

    def __init__(self, app, api_key: str | None):
        self.app, self.key = app, api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if self.key is not None and scope["type"] == "http" and scope["path"].startswith("/v1/"):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.key):
                what = "Incorrect API key provided" if given else "Missing API key: send " \
                    "'Authorization: Bearer <key>' (gdsllm serve --api-key)"
                e = ApiError(401, what, code="invalid_api_key")
                return await error_response(e)(scope, receive, send)
        await self.app(scope, receive, send)


class Observed:
    """ASGI middleware: gdsllm_http_requests_total{route,status} and the request latency (for a
    stream: until its last byte), on the service's metrics."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.metrics is None:
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def watch(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            path = scope["path"]
            route = next((r for r in ROUTES[::-1] if path == r or path.startswith(r + "/")), "other")
            self.metrics.observe_http(route, status[0], time.perf_counter() - start)
