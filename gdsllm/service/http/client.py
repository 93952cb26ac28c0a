"""A small synchronous client of the OpenAI-compatible HTTP API (standard library only), with
the methods `gdsllm generate` and `gdsllm run` use on a ZeroMQ Client, so the endpoint's scheme
picks the client:

    with connect("http://127.0.0.1:8000", api_key="sekrit") as c:   # or tcp://...: the ZeroMQ Client
        for delta in c.stream(messages=[{"role": "user", "content": "Hi"}], temperature=0):
            print(delta, end="")
        print(c.health().status)

An error reply is a ServiceError whose code is OpenAI's (e.g. "queue_full", "model_not_found",
"invalid_api_key"), an unreachable server a ServiceError "unreachable"; the key defaults to
$GDSLLM_API_KEY.
"""
from __future__ import annotations

import http.client
import json
import os
import urllib.parse
from types import SimpleNamespace

from gdsllm.service.client import Client, ServiceError
from gdsllm.service.http import sse


def connect(endpoint: str, timeout: float = 300.0, api_key: str | None = None, server_key=None):
    """HttpClient for http(s):// endpoints, the ZeroMQ Client for tcp:// and ipc:// (with the
    server's CurveZMQ public key `server_key`, if it has one)."""
    if endpoint.startswith(("http://", "https://")):
        return HttpClient(endpoint, timeout=timeout, api_key=api_key)
    return Client(endpoint, timeout=timeout, server_key=server_key)


class HttpClient:
    def __init__(self, base_url: str, timeout: float = 300.0, api_key: str | None = None):
        self.base_url, self.timeout = base_url.rstrip("/"), timeout
        self.api_key = api_key if api_key is not None else os.environ.get("GDSLLM_API_KEY")
        url = urllib.parse.urlsplit(self.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an HTTP endpoint: {base_url!r} (e.g. http://127.0.0.1:8000)")
        self.url, self.prefix = url, url.path.rstrip("/").removesuffix("/v1")
        self.model: str | None = None

    def close(self) -> None:
        pass

    def __enter__(self) -> "HttpClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self, method: str, path: str, body: dict | None = None):
        cls = http.client.HTTPSConnection if self.url.scheme == "https" else http.client.HTTPConnection
        conn = cls(self.url.hostname, self.url.port, timeout=self.timeout)
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            conn.request(method, self.prefix + path, None if body is None else json.dumps(body), headers)
            resp = conn.getresponse()
        except TimeoutError:
            conn.close()
            raise TimeoutError(f"no reply from {self.base_url} within {self.timeout:g} s") from None
        except OSError as e:
            conn.close()
            raise ServiceError("unreachable", f"cannot reach {self.base_url}: {e.strerror or e}") from None
        return conn, resp

    def _json(self, method: str, path: str, body: dict | None = None, ok=(200,)) -> dict:
        conn, resp = self._open(method, path, body)
        try:
            data = resp.read()
        finally:
            conn.close()
        try:
            reply = json.loads(data)
        except ValueError:
            raise ServiceError("bad_reply", f"{self.base_url}{path} answered {resp.status} with no "
                                            f"JSON body") from None
        if resp.status not in ok:
            raise _error(resp.status, reply)
        return reply

    def health(self) -> SimpleNamespace:
        """The server's /health (status "ok", "loading" or "degraded", the model, queue sizes)."""
        return SimpleNamespace(**self._json("GET", "/health", ok=(200, 503)))

    def models(self) -> list[str]:
        return [m["id"] for m in self._json("GET", "/v1/models")["data"]]

    def stream(self, prompt: str | None = None, *, messages=None, **params):
        """Yield the generated text as it arrives: /v1/chat/completions with `messages`, else
        /v1/completions."""
        if self.model is None:
            self.model = self.models()[0]
        body = {"model": self.model, "stream": True,
                **{k: v for k, v in params.items() if v is not None}}
        if messages is not None:
            path, body["messages"] = "/v1/chat/completions", list(messages)
        else:
            path, body["prompt"] = "/v1/completions", prompt
        conn, resp = self._open("POST", path, body)
        try:
            if resp.status != 200:
                try:
                    reply = json.loads(resp.read())
                except ValueError:
                    reply = {}
                raise _error(resp.status, reply)
            for chunk in sse.parse(resp):
                if "error" in chunk:
                    raise _error(500, chunk)
                for choice in chunk.get("choices", []):
                    text = choice["delta"].get("content") if "delta" in choice else choice.get("text")
                    if text:
                        yield text
        finally:
            conn.close()  # a caller that stops early hangs up: the server cancels the request


def _error(status: int, reply: dict) -> ServiceError:
    err = reply.get("error") if isinstance(reply, dict) else None
    if not isinstance(err, dict):
        return ServiceError(str(status), f"HTTP {status}")
    e = ServiceError(err.get("code") or err.get("type") or str(status), f"HTTP {status}: {err.get('message')}")
    e.status = status
    return e
