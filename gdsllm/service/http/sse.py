"""Server-sent events as OpenAI streams them: `data: {json}` blocks, then `data: [DONE]`.

    yield sse.event({"choices": [...]})        # b'data: {...}\\n\\n'
    yield sse.DONE                             # b'data: [DONE]\\n\\n'
    for obj in sse.parse(lines): ...           # client side: dicts until [DONE]

One JSON object per event, on one line (json.dumps never writes a raw newline), so a reader may
split on blank lines or read `data:` lines.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

DONE = b"data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering


def event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def parse(lines: Iterable[bytes | str]) -> Iterator[dict]:
    """The JSON objects of an event stream, line by line, until `data: [DONE]` (comments and
    other fields skipped). A line that is not JSON raises ValueError naming it."""
    for line in lines:
        if isinstance(line, bytes):
            line = line.decode("utf-8")
        line = line.rstrip("\r\n")
        if not line.startswith("data:"):
            continue
        data = line[5:].lstrip(" ")
        if data == "[DONE]":
            return
        try:
            yield json.loads(data)
        except json.JSONDecodeError:
            raise ValueError(f"not a JSON event: {data[:200]!r}") from None
