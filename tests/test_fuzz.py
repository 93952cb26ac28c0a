"""Fuzzing the public socket: 10,000 seeded malformed messages (random bytes, truncated msgpack,
wrong types, huge fields, nesting bombs, extra frames, worker-only messages) each get exactly one
error reply; requests over the 1 MiB limit get one too, frames over 4 MiB are dropped with their
connection. The service stays ok
and a normal request afterwards gets the reference tokens.
"""
from __future__ import annotations

import math
import random
from collections import Counter

import msgpack
import pytest
import zmq

from gdsllm.service.client import Client
from ipc.codec import MAX_FRAME_BYTES, MAX_REQUEST_BYTES
from service_helpers import (N, PROMPTS, Service, light_reference, model_dir,  # noqa: F401
                             single_thread_workers)

pytestmark = pytest.mark.usefixtures("single_thread_workers")
MESSAGES = 10_000
OVERSIZED = 12
SEED = 20261128


def _valid(rng: random.Random) -> dict:
    return {"type": "generate", "request_id": f"f{rng.randrange(10**6)}", "prompt": "hello",
            "max_tokens": 0, "temperature": 0.5}  # max_tokens 0: never runs, whatever else holds


def _wrong(rng: random.Random, depth: int = 0):
    """A random msgpack value of any type."""
    kinds = ["int", "neg", "big", "float", "nan", "str", "bytes", "none", "bool", "list", "map"]
    k = rng.choice(kinds if depth < 3 else kinds[:9])
    return {"int": lambda: rng.randrange(1000), "neg": lambda: -rng.randrange(1, 2**63),
            "big": lambda: 2**64 - 1, "float": lambda: rng.uniform(-1e9, 1e9),
            "nan": lambda: rng.choice([math.nan, math.inf, -math.inf]),
            "str": lambda: "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(40))),
            "bytes": lambda: rng.randbytes(rng.randrange(40)), "none": lambda: None,
            "bool": lambda: rng.random() < 0.5,
            "list": lambda: [_wrong(rng, depth + 1) for _ in range(rng.randrange(4))],
            "map": lambda: {_wrong(rng, 3) if rng.random() < 0.3 else f"k{i}": _wrong(rng, depth + 1)
                            for i in range(rng.randrange(4))}}[k]()


def _pack(d) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


def malformed(rng: random.Random) -> list[bytes]:
    """One malformed client message: its frames (normally one)."""
    kind = rng.randrange(10)
    if kind == 0:  # random bytes
        return [rng.randbytes(rng.randrange(0, 200))]
    if kind == 1:  # valid msgpack, cut short
        raw = _pack({**_valid(rng), "stop": ["a", "b"], "messages": None})
        return [raw[: rng.randrange(1, len(raw))]]
    if kind == 2:  # a field of the wrong type (max_tokens never becomes a valid integer)
        d = _valid(rng)
        f = rng.choice(["request_id", "prompt", "messages", "max_tokens", "temperature", "top_p",
                        "top_k", "seed", "stop", "stream", "ignore_eos"])
        v = _wrong(rng)
        d[f] = v if f != "max_tokens" or not isinstance(v, int) or isinstance(v, bool) else str(v)
        return [_pack(d)]
    if kind == 3:  # unknown or worker-only types, missing or odd type tags
        t = rng.choice(["start_pass", "shutdown", "load", "run", "release", "launch", "", None, 7,
                        "health_reply", "final", "token", "error"])
        return [_pack({"type": t, "request_id": "x", **({"seq_ids": [1]} if rng.random() < .5 else {})})]
    if kind == 4:  # not a map at all
        return [_pack(_wrong(rng))]
    if kind == 5:  # extra frames
        return [_pack({"type": "health", "request_id": "h"})] + [rng.randbytes(8) for _ in range(rng.randrange(1, 4))]
    if kind == 6 and rng.random() < 0.05:  # huge fields, under the 1 MiB limit
        big = rng.choice(["request_id", "prompt", "stop", "messages", "nest"])
        d = _valid(rng)
        if big == "request_id":
            d["request_id"] = "r" * 600_000
        elif big == "prompt":
            d["prompt"] = "word " * 180_000
        elif big == "stop":
            d["stop"] = ["s"] * 100_000
        elif big == "messages":
            d["prompt"], d["messages"] = None, [{"role": "wizard", "content": "x"}] * 40_000
        else:  # 100,000 nested arrays: msgpack's own depth limit must refuse it
            return [b"\x91" * 100_000 + b"\xc0"]
        return [_pack(d)]
    if kind == 7:  # bad values of the right types
        d = _valid(rng)
        d.update(rng.choice([{"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -5}, {"prompt": ""},
                             {"seed": 2**64 - 1}, {"stop": [""]}, {"request_id": ""},
                             {"prompt": None, "messages": []}, {"max_tokens": -3}]))
        return [_pack(d)]
    if kind == 8:  # cancels of nothing
        return [_pack({"type": "cancel", "request_id": f"none-{rng.randrange(10**6)}"})]
    d = _valid(rng)  # unknown extra fields, non-string keys
    d[rng.choice(["colour", 7, b"bin", 1.5])] = _wrong(rng)
    return [_pack(d)]


def test_fuzz_public_socket(model_dir, light_reference):
    rng = random.Random(SEED)
    with Service(model_dir) as s:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(s.endpoint)
        replies, sent = [], 0

        def drain(until: int, timeout_ms: int) -> None:
            while len(replies) < until and sock.poll(timeout_ms):
                replies.append(msgpack.unpackb(sock.recv(), raw=False))

        while sent < MESSAGES:
            for _ in range(min(100, MESSAGES - sent)):
                sock.send_multipart(malformed(rng))
                sent += 1
            drain(sent - 50, 30_000)  # keep a bounded number in flight
        drain(sent, 60_000)
        assert len(replies) == sent, f"{sent - len(replies)} messages got no reply"
        types = {r["type"] for r in replies}
        assert types <= {"error", "health_reply"}, types
        errors = [r for r in replies if r["type"] == "error"]
        assert {r["code"] for r in errors} <= {"bad_request", "not_found"}
        assert all(r["message"] for r in errors)

        dropped = refused = 0
        for i in range(OVERSIZED):  # over the request limit: an error reply; over zmq.MAXMSGSIZE:
            other = ctx.socket(zmq.DEALER)  # disconnected before being buffered whole
            other.setsockopt(zmq.LINGER, 0)
            other.connect(s.endpoint)
            frame = i % 2 == 1
            size = MAX_FRAME_BYTES + rng.randrange(1, 4 << 20) if frame else \
                MAX_REQUEST_BYTES + rng.randrange(1, MAX_FRAME_BYTES - MAX_REQUEST_BYTES - 4096)
            other.send(_pack({**_valid(rng), "prompt": "x" * size}))
            if frame:
                dropped += not other.poll(300)
            else:
                assert other.poll(30_000), "no reply to a request over the limit"
                r = msgpack.unpackb(other.recv(), raw=False)
                refused += r["type"] == "error" and r["code"] == "bad_request" and "exceeds" in r["message"]
            other.close()
        assert dropped == OVERSIZED // 2 and refused == OVERSIZED - OVERSIZED // 2
        codes = sorted(Counter(r.get("code", r["type"]) for r in replies).items())
        print(f"fuzz: {sent} malformed messages, {len(replies)} replies {codes}, "
              f"{refused} requests over the limit refused, {dropped} oversized frames dropped")
        sock.close()
        ctx.term()
        with Client(s.endpoint, timeout=30) as c:
            h = c.health()
            assert h.status == "ok" and h.requests_running == h.requests_waiting == 0
            f = c.generate(PROMPTS[5], max_tokens=N, temperature=0)
            assert f.token_ids == light_reference[PROMPTS[5]]
