"""The OpenAI-compatible HTTP API and the chat page, as an ASGI application (Starlette).

    app = build_app(Frontend("tcp://127.0.0.1:5555"), Guard(api_keys=("sekrit",)), metrics=service_metrics)
    # GET /  (chat page)   GET /health   GET /v1/models   POST /v1/completions
    # POST /v1/chat/completions  (stream: server-sent events, then `data: [DONE]`)

Why Starlette (served by uvicorn): it is the layer vLLM's FastAPI sits on, without FastAPI's
pydantic models (the request rules live in gdsllm.service.http.openai, one place, as everywhere
in GdsLLM); it runs in the coordinator's own asyncio loop next to the ZeroMQ sockets; its
StreamingResponse watches for the client's disconnect while streaming, which is what cancels a
request whose reader left. aiohttp would do too, but it brings its own HTTP stack and handler
model for no gain here.

Every error is OpenAI's JSON error shape with its status: 400 bad request (also a Host header not
allowed), 401 missing or wrong key (when keys are set; /v1/* only: the page and /health stay
open), 403 a cross-site Origin, 404 unknown model or route, 405 wrong method (with Allow), 408 a
body not sent in time, 413 a body over MAX_BODY_BYTES, 415 a POST that is not JSON, 429 the
coordinator's queue or the caller's in-flight cap is full (its `busy`), 503 loading or degraded.

The Guard (one ASGI middleware) is what keeps a web page the user visits from reaching the API:
the Host must be a loopback name or one allowed (DNS rebinding), an Origin must be loopback, the
server's own or one allowed (cross-site requests), and POSTs must say JSON (a form cannot). It
also names the caller whose in-flight requests the coordinator caps (Generate.caller): the API
key it sent (a hash of it), or its connection (address:port) when the server has no key.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import time
import urllib.parse
import uuid
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ipc.codec import MAX_REQUEST_BYTES
from ipc.messages import Final, TokenChunk

from gdsllm.service.client import ServiceError
from gdsllm.service.http import openai, sse
from gdsllm.service.http.frontend import ClientGone, Frontend
from gdsllm.service.http.openai import ApiError

STATIC = Path(__file__).resolve().parent / "static"
# A body becomes one Generate on the ZeroMQ link: msgpack never takes more bytes than the JSON it
# came from, plus the fields the front end adds and the ones left at their defaults (< 1 KiB).
MAX_BODY_BYTES = MAX_REQUEST_BYTES - (16 << 10)
DRAIN_BYTES = 4 * MAX_BODY_BYTES  # what is read of a body too large, so that the 413 arrives
BODY_TIMEOUT_S = 60.0  # a body must arrive within this once its headers did
ROUTES = ("/", "/static", "/health", "/v1/models", "/v1/completions", "/v1/chat/completions")


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


def _reply_error(e: Exception) -> ApiError:
    if isinstance(e, ServiceError):
        return openai.service_error(e)
    return openai.unavailable(str(e))  # TimeoutError: the coordinator stopped answering


async def _body(request: Request):
    """The JSON body: 413 over MAX_BODY_BYTES, 408 if it does not arrive within BODY_TIMEOUT_S,
    400 (one line) if it is not JSON, nests too deep, or holds text that is not Unicode."""
    declared = request.headers.get("content-length", "")
    too_big = declared.isdigit() and int(declared) > MAX_BODY_BYTES
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                size += len(chunk)
                too_big = too_big or size > MAX_BODY_BYTES
                if too_big and size > DRAIN_BYTES:
                    break
                if not too_big:
                    chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s",
                       code="request_timeout") from None
    if too_big:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes "
                            f"({declared or 'more'} bytes sent)", code="request_too_large")
    try:
        body = json.loads(b"".join(chunks))
        json.dumps(body, ensure_ascii=False).encode("utf-8")  # a lone surrogate (\ud800) fails
    except UnicodeEncodeError:
        raise openai.bad("We could not parse the JSON body of your request (a string holds a lone "
                         "UTF-16 surrogate, which is not text)") from None
    except RecursionError:
        raise openai.bad("We could not parse the JSON body of your request (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of > 4300 digits
        raise openai.bad(f"We could not parse the JSON body of your request ({str(e)[:200]})") from None
    return body


def build_app(fe: Frontend, guard: "Guard | None" = None, *, metrics=None) -> Starlette:
    """The routes behind `guard` (default: no key, loopback Host and Origin only)."""
    guard = guard or Guard()

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
        args = dict(messages=req.messages, request_id=rid, caller=Guard.caller(request.scope),
                    **req.params)
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
    return Observed(guard.wrap(app), metrics)


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
    response = error_response(err)
    response.headers.update(e.headers or {})  # 405: Allow
    return response


async def _internal_error(request: Request, e: Exception) -> Response:
    return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))


LOOPBACK_NAMES = ("localhost",)


def _loopback(host: str) -> bool:
    host = host.lower().rstrip(".")
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _hostname(host: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1', 'Example.com.' -> 'example.com'."""
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.lower().rstrip(".")


class Guard:
    """Who may call: the Host and Origin allow-lists, JSON on POSTs, the API keys (/v1/* only when
    keys are set), and the caller each request is counted against. `hosts` and `origins` extend
    the defaults (loopback names and addresses, the bound address, same-origin); "*" allows any."""

    def __init__(self, api_keys=(), hosts=(), origins=()):
        self.keys = [k.encode() for k in api_keys]
        self.hosts = {_hostname(h) for h in hosts}
        self.origins = {o.rstrip("/").lower() for o in origins}

    def wrap(self, app):
        async def guarded(scope, receive, send):
            if scope["type"] == "http":
                refusal = self.check(scope)
                if refusal is not None:
                    return await error_response(refusal)(scope, receive, send)
            await app(scope, receive, send)
        return guarded

    def check(self, scope) -> ApiError | None:
        """Why this request is refused (and set its caller), or None."""
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if host and "*" not in self.hosts and not _loopback(_hostname(host)) \
                and _hostname(host) not in self.hosts:
            return ApiError(400, f"Host {host[:100]!r} is not allowed (the API answers loopback names; "
                                 f"gdsllm serve --http-allowed-hosts adds others)", code="host_not_allowed")
        origin = headers.get(b"origin", b"").decode("latin-1").rstrip("/").lower()
        if origin and not self._origin_ok(origin, scope.get("scheme", "http"), host.lower()):
            return ApiError(403, f"Origin {origin[:100]!r} is not allowed: cross-site requests are "
                                 f"refused (gdsllm serve --http-allowed-origins adds origins)",
                            code="origin_not_allowed")
        if scope["method"] == "POST":
            ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if ctype != b"application/json":
                return ApiError(415, f"Content-Type must be application/json, got "
                                     f"{ctype.decode('latin-1')[:100]!r}", code="unsupported_media_type")
        caller = None
        if self.keys:
            auth = headers.get(b"authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            match = [hmac.compare_digest(given, k) for k in self.keys]  # every key: constant time
            if any(match):
                caller = "key:" + hashlib.sha256(given).hexdigest()[:16]
            elif scope["path"].startswith("/v1/"):
                what = "Incorrect API key provided" if given else "Missing API key: send " \
                    "'Authorization: Bearer <key>' (gdsllm serve --api-key-file)"
                return ApiError(401, what, code="invalid_api_key")
        if caller is None:
            client = scope.get("client") or ("unknown", 0)
            caller = f"conn:{client[0]}:{client[1]}"
        scope.setdefault("state", {})["caller"] = caller
        return None

    def _origin_ok(self, origin: str, scheme: str, host: str) -> bool:
        if "*" in self.origins or origin in self.origins or origin == f"{scheme}://{host}":
            return True
        url = urllib.parse.urlsplit(origin)
        return url.scheme in ("http", "https") and bool(url.hostname) and _loopback(url.hostname)

    @staticmethod
    def caller(scope) -> str | None:
        return scope.get("state", {}).get("caller")


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
