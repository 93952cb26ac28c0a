"""Python clients of a GdsLLM server (`gdsllm serve`), synchronous and asyncio.

    from gdsllm.service.client import Client
    with Client("tcp://127.0.0.1:5555") as c:
        print(c.generate("Once upon a time", max_tokens=32, temperature=0).text)
        c.generate("Count:", max_tokens=64, stop=["\n"], stop_token_ids=[2])   # any Generate field
        for delta in c.stream(messages=[{"role": "user", "content": "Hi"}]):
            print(delta, end="", flush=True)
        print(c.health().status)

    async with AsyncClient(endpoint) as c:           # concurrent requests on one socket
        final = await c.generate("Hello", max_tokens=8)
        async for delta in c.stream("Hello"): ...

Every wait has a deadline (`timeout`, seconds without any reply): a dead or absent server is a
TimeoutError naming the endpoint, an error reply is a ServiceError with its code. A server started
with --curve-secret-key needs `server_key=` (its Z85 public key, or the `.key` file of `gdsllm
keygen`); with a wrong key or none, the handshake fails and nothing ever arrives (a TimeoutError).
A server with --curve-allow also wants `client_keys=load_secret_key(".../me.key_secret")`, a pair
whose public half it lists.
"""
from __future__ import annotations

import asyncio
import contextlib
import uuid

import zmq
import zmq.asyncio

from ipc import sockets
from ipc.codec import MAX_REQUEST_BYTES, too_large
from ipc.messages import (Cancel, ChatMessage, Error, Final, Generate, Health, HealthReply, ProtocolError,
                          TokenChunk, decode, encode)

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"


class ServiceError(RuntimeError):
    """The server answered a request with an Error: `code` is bad_request, not_found, worker_died,
    internal or busy."""

    def __init__(self, code: str, message: str, request_id: str = ""):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.request_id = code, message, request_id


def _request(prompt, messages, request_id, params) -> Generate:
    if messages is not None:
        messages = [m if isinstance(m, ChatMessage) else ChatMessage(m["role"], m["content"])
                    for m in messages]
    params = {k: v for k, v in params.items() if v is not None or k == "seed"}
    if "stop" in params:
        params["stop"] = [params["stop"]] if isinstance(params["stop"], str) else list(params["stop"])
    if "stop_token_ids" in params:  # token ids that end the generation besides end-of-sequence
        params["stop_token_ids"] = list(params["stop_token_ids"])
    return Generate(request_id=request_id or uuid.uuid4().hex, prompt=prompt, messages=messages,
                    **params)


def _timeout(endpoint: str, seconds: float) -> TimeoutError:
    return TimeoutError(f"no reply from {endpoint} within {seconds:g} s; is `gdsllm serve` running "
                        f"there?")


class Client:
    """Synchronous client: one request at a time on one DEALER socket (not thread-safe)."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout: float = 60.0, server_key=None,
                 client_keys=None):
        self.endpoint, self.timeout = endpoint, timeout
        self.ctx = zmq.Context()
        self.ctx.setsockopt(zmq.LINGER, 0)  # never a term() that waits on an unreachable peer
        self.sock = sockets.dealer(self.ctx, endpoint, server_key, client_keys)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, msg) -> None:
        sockets.send(self.sock, msg, self.timeout)

    def _recv(self, request_id: str):
        while True:
            try:
                msg = sockets.recv(self.sock, self.timeout, max_bytes=None)  # replies: no limit
            except TimeoutError:
                raise _timeout(self.endpoint, self.timeout) from None
            if getattr(msg, "request_id", None) in (request_id, ""):
                if isinstance(msg, Error):
                    raise ServiceError(msg.code, msg.message, msg.request_id)
                return msg
            # a late reply to an earlier request (e.g. after a cancel or a timeout): skip it

    def stream_messages(self, prompt: str | None = None, *, messages=None, request_id=None, **params):
        """Yield TokenChunk messages, then the Final."""
        req = _request(prompt, messages, request_id, {**params, "stream": True})
        self._send(req)
        done = False
        try:
            while True:
                try:
                    msg = self._recv(req.request_id)
                except ServiceError:
                    done = True  # the server ended the request with an Error: nothing to cancel
                    raise
                done = isinstance(msg, Final)
                yield msg
                if done:
                    return
        finally:
            if not done and not self.sock.closed:  # the caller stopped early: free the server's work
                try:
                    self._send(Cancel(req.request_id))
                except (TimeoutError, zmq.ZMQError):
                    pass

    def stream(self, prompt: str | None = None, *, messages=None, **params):
        """Yield the generated text as it arrives (deltas)."""
        for msg in self.stream_messages(prompt, messages=messages, **params):
            if isinstance(msg, TokenChunk) and msg.text:
                yield msg.text

    def generate(self, prompt: str | None = None, *, messages=None, request_id=None, **params) -> Final:
        """The whole generation: Final(text, token_ids, finish_reason, usage, timings)."""
        req = _request(prompt, messages, request_id, {**params, "stream": False})
        self._send(req)
        return self._recv(req.request_id)

    def cancel(self, request_id: str) -> None:
        self._send(Cancel(request_id))

    def health(self) -> HealthReply:
        rid = f"health-{uuid.uuid4().hex[:8]}"
        self._send(Health(rid))
        return self._recv(rid)


class AsyncClient:
    """asyncio client: any number of concurrent requests share one DEALER socket; replies are
    routed to their request by id."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout: float = 60.0, server_key=None,
                 client_keys=None):
        self.endpoint, self.timeout = endpoint, timeout
        self.ctx = zmq.asyncio.Context()
        self.ctx.setsockopt(zmq.LINGER, 0)
        self.sock = sockets.dealer(self.ctx, endpoint, server_key, client_keys)
        self.queues: dict[str, asyncio.Queue] = {}
        self.reader: asyncio.Task | None = None

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        self.sock.close(linger=0)
        self.ctx.term()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _read(self) -> None:
        while True:
            raw = await self.sock.recv()
            try:  # a long non-streamed Final may exceed the request limit: replies have none
                msg = decode(raw, max_bytes=None)
            except ProtocolError:
                continue  # not a reply of this protocol: one bad frame must not stop the reader
            q = self.queues.get(getattr(msg, "request_id", ""))
            if q is not None:
                q.put_nowait(msg)

    async def _exchange(self, msg, rid: str):
        """Send `msg`, then yield every reply to `rid` until a Final, HealthReply or Error."""
        if self.reader is None or self.reader.done():
            self.reader = asyncio.create_task(self._read())
        raw = encode(msg)
        if len(raw) > MAX_REQUEST_BYTES:  # the server refuses it anyway: never send it, so a link
            # shared by many callers (the HTTP front end's) carries nothing it could be dropped for
            raise ServiceError("bad_request", f"request {rid}: {too_large(len(raw))}", rid)
        q = self.queues[rid] = asyncio.Queue()
        finished = False
        try:
            await asyncio.wait_for(self.sock.send(raw), self.timeout)
            while True:
                try:
                    reply = await asyncio.wait_for(q.get(), self.timeout)
                except asyncio.TimeoutError:
                    raise _timeout(self.endpoint, self.timeout) from None
                if isinstance(reply, Error):
                    finished = True
                    raise ServiceError(reply.code, reply.message, reply.request_id)
                finished = not isinstance(reply, TokenChunk)
                yield reply
                if finished:
                    return
        finally:
            del self.queues[rid]
            if not finished and isinstance(msg, Generate):
                self.sock.send(encode(Cancel(rid)), zmq.NOBLOCK)

    async def stream_messages(self, prompt: str | None = None, *, messages=None, request_id=None,
                              **params):
        req = _request(prompt, messages, request_id, {**params, "stream": True})
        async with contextlib.aclosing(self._exchange(req, req.request_id)) as replies:
            async for msg in replies:
                yield msg

    async def stream(self, prompt: str | None = None, *, messages=None, **params):
        async for msg in self.stream_messages(prompt, messages=messages, **params):
            if isinstance(msg, TokenChunk) and msg.text:
                yield msg.text

    async def generate(self, prompt: str | None = None, *, messages=None, request_id=None,
                       **params) -> Final:
        req = _request(prompt, messages, request_id, {**params, "stream": False})
        async with contextlib.aclosing(self._exchange(req, req.request_id)) as replies:
            async for msg in replies:
                return msg

    async def cancel(self, request_id: str) -> None:
        await self.sock.send(encode(Cancel(request_id)))

    async def health(self) -> HealthReply:
        rid = f"health-{uuid.uuid4().hex[:8]}"
        async with contextlib.aclosing(self._exchange(Health(rid), rid)) as replies:
            async for msg in replies:
                return msg

