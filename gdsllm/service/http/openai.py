"""OpenAI's request and response shapes: parse a JSON body into coordinator parameters (or an
ApiError naming the bad field), and build completion / chat objects and stream chunks.

    req = parse_request(body, chat=True)                # ApiError(400) on a bad field
    final = await client.generate(req.prompt, messages=req.messages, **req.params)
    return completion_body(req, "chatcmpl-1", "my-model", created, final)
    except ServiceError as e: raise service_error(e)    # busy -> 429, bad_request -> 400, ...

Only `n=1` is served. Fields GdsLLM cannot honour (logprobs, tools, penalties, ...) are refused
with 400 when set to anything but their neutral value; unknown fields are ignored, as vLLM does,
so clients that send extras keep working. `top_k`, `ignore_eos` and `stop_token_ids` are
accepted as vLLM's extensions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_MAX_TOKENS = 1 << 30  # chat: until eos or the end of the context (the coordinator caps it)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
         "tool": "tool"}
# field -> its neutral values; anything else is refused (GdsLLM does not compute it)
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
               "best_of": (None, 1), "suffix": (None, ""), "tools": (None, []), "functions": (None, []),
               "tool_choice": (None, "none", "auto"), "logit_bias": (None, {}),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0)}


class ApiError(Exception):
    """An error reply in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"} if self.status in (429, 503) else {}


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, "server_error", code="service_unavailable")


def service_error(e) -> ApiError:
    """A coordinator's Error (gdsllm.service.client.ServiceError) as an HTTP error."""
    if e.code == "bad_request":
        return bad(e.message)
    if e.code == "busy":
        return ApiError(429, e.message, "rate_limit_error", code="queue_full")
    if e.code == "worker_died" or "degraded" in e.message or "shutting down" in e.message:
        return unavailable(e.message)
    if e.code == "not_found":
        return ApiError(404, e.message, code="not_found")
    return ApiError(500, e.message, "server_error", code=e.code)


@dataclass
class Request:
    """One parsed /v1/completions or /v1/chat/completions body."""

    chat: bool
    model: str | None
    prompt: str | None = None
    messages: list[dict] | None = None
    params: dict = field(default_factory=dict)  # Generate's fields: max_tokens, temperature, ...
    stream: bool = False
    include_usage: bool = False


INT64 = 1 << 63  # integers cross to the coordinator as msgpack int64: bounded here, checked there


def _show(v) -> str:
    """A value for an error message, on one short line (10^400 has 401 digits)."""
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _int64(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -INT64 <= v < INT64


def _number(body: dict, name: str, default, integer: bool = False):
    """An integer (int64) or a finite number (as a float) from `body`, or `default` if absent."""
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got {_show(v)}", name)
    if integer:
        if not _int64(v):
            raise bad(f"'{name}' must be an integer from -2^63 to 2^63-1, got {_show(v)}", name)
        return v
    try:
        f = float(v)  # an integer literal of 400 digits is valid JSON: float() overflows
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise bad(f"'{name}' must be a finite number, got {_show(v)}", name)
    return f


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be true or false, got {_show(v)}", name)
    return v


def _text(content, where: str) -> str:
    """A message's content: a string, or a list of text parts (images are refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}: only text content parts are supported", where)
            out.append(part["text"])
        return "".join(out)
    raise bad(f"{where}: content must be a string or a list of text parts", where)


def _messages(v) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object", where)
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role must be one of {sorted(ROLES)}, got {_show(role)}", f"{where}.role")
        out.append({"role": ROLES[role], "content": _text(m.get("content"), f"{where}.content")})
    return out


def _prompt(v) -> str:
    if isinstance(v, list) and len(v) == 1:
        v = v[0]
    if not isinstance(v, str):
        raise bad("'prompt' must be a string (token ids and batches of prompts are not supported)",
                  "prompt")
    return v


def _stop(v) -> list[str]:
    if v is None:
        return []
    v = [v] if isinstance(v, str) else v
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad("'stop' must be a string or a list of strings", "stop")
    return v


def _token_ids(v) -> list[int]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(_int64(t) for t in v):
        raise bad("'stop_token_ids' must be a list of integers from -2^63 to 2^63-1",
                  "stop_token_ids")
    return v


def parse_request(body, chat: bool) -> Request:
    """Validate a request body; raise ApiError(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("'model' must be a string", "model")
    for name, neutral in UNSUPPORTED.items():
        if name in body and body[name] not in neutral:
            raise bad(f"'{name}' is not supported by this server", name)
    if _number(body, "n", 1, integer=True) != 1:
        raise bad("only n=1 is supported", "n")
    req = Request(chat=chat, model=model, stream=_bool(body, "stream"))
    if chat:
        if "messages" not in body:
            raise bad("'messages' is required", "messages")
        req.messages = _messages(body["messages"])
        fmt = body.get("response_format")
        if fmt not in (None, {"type": "text"}):
            raise bad("'response_format' other than text is not supported", "response_format")
    else:
        if "prompt" not in body:
            raise bad("'prompt' is required", "prompt")
        req.prompt = _prompt(body["prompt"])
    opts = body.get("stream_options")
    if opts is not None:
        if not req.stream:
            raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(opts, dict):
            raise bad("'stream_options' must be an object", "stream_options")
        req.include_usage = _bool(opts, "include_usage")
    default_max = CHAT_MAX_TOKENS if chat else COMPLETION_MAX_TOKENS
    max_tokens = _number(body, "max_tokens", None, integer=True)
    if chat and max_tokens is None:
        max_tokens = _number(body, "max_completion_tokens", None, integer=True)
    top_k = _number(body, "top_k", 0, integer=True)
    req.params = dict(max_tokens=default_max if max_tokens is None else max_tokens,
                      temperature=_number(body, "temperature", 1.0),
                      top_p=_number(body, "top_p", 1.0),
                      top_k=0 if top_k == -1 else top_k,  # vLLM's -1: off
                      seed=_number(body, "seed", None, integer=True),
                      stop=_stop(body.get("stop")),
                      stop_token_ids=_token_ids(body.get("stop_token_ids")),
                      ignore_eos=_bool(body, "ignore_eos"),
                      draft_tokens=_number(body, "draft_tokens", None, integer=True),
                      draft_tree=_number(body, "draft_tree", None, integer=True))
    return req


# ---------------------------------------------------------------- responses


def finish_reason(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


def usage(final) -> dict:
    return {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens,
            "total_tokens": final.prompt_tokens + final.completion_tokens}


def _object(req: Request, rid: str, model: str, created: int, chunk: bool) -> dict:
    kind = ("chat.completion" if req.chat else "text_completion") + (".chunk" if chunk and req.chat else "")
    return {"id": rid, "object": kind, "created": created, "model": model}


def completion_body(req: Request, rid: str, model: str, created: int, final) -> dict:
    """The whole (non-streamed) answer."""
    if req.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": final.text},
                  "logprobs": None, "finish_reason": finish_reason(final.finish_reason)}
    else:
        choice = {"index": 0, "text": final.text, "logprobs": None,
                  "finish_reason": finish_reason(final.finish_reason)}
    return {**_object(req, rid, model, created, False), "choices": [choice], "usage": usage(final)}


def chunk_body(req: Request, rid: str, model: str, created: int, *, text: str | None = None,
               role: bool = False, finish: str | None = None) -> dict:
    """One streamed chunk: a text delta, the chat's opening role delta, or the finish."""
    if req.chat:
        delta = {"role": "assistant", "content": ""} if role else \
            ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    body = {**_object(req, rid, model, created, True), "choices": [choice]}
    if req.include_usage:
        body["usage"] = None
    return body


def usage_chunk(req: Request, rid: str, model: str, created: int, final) -> dict:
    """The last chunk when stream_options.include_usage is set: no choices, the usage."""
    return {**_object(req, rid, model, created, True), "choices": [], "usage": usage(final)}
