"""One request must never fail another (issue 24): a request over the size limit gets an error
reply, over ZeroMQ and through the HTTP front end's shared link, while other streams go on; huge
chat requests are tokenized off the coordinator's event loop, so a running stream keeps getting
tokens meanwhile. Real processes and sockets, a tiny random model.
"""
from __future__ import annotations

import json
import threading

import msgpack
import pytest
import zmq

from gdsllm.service.client import Client
from ipc.codec import MAX_REQUEST_BYTES
from http_helpers import HttpServe, open_stream, post
from service_helpers import PROMPTS, Service, model_dir, single_thread_workers  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread_workers")
LONG = {"max_tokens": 300, "ignore_eos": True, "temperature": 0}


def _dealer(ctx, endpoint):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def _recv(sock, timeout_s=60.0):
    assert sock.poll(int(timeout_s * 1000)), "no reply"
    return msgpack.unpackb(sock.recv(), raw=False)


@pytest.fixture(scope="module")
def service(model_dir):
    """One service (default settings) for the ZeroMQ tests: each leaves it idle, its tokenizer
    as it found it (the processes and the arena are checked gone when the module ends)."""
    with Service(model_dir) as s:
        yield s


def test_zeromq_request_over_the_limit_gets_an_error_and_the_link_stays(service):
    s = service
    with Client(s.endpoint, timeout=120) as other:
        stream = other.stream_messages(PROMPTS[0], **LONG)
        next(stream)  # another client's stream is running
        ctx = zmq.Context()
        sock = _dealer(ctx, s.endpoint)
        try:
            big = {"type": "generate", "request_id": "big-1", "prompt": "a" * (MAX_REQUEST_BYTES + 100)}
            sock.send(msgpack.packb(big))
            r = _recv(sock)
            assert r["type"] == "error" and r["code"] == "bad_request" and r["request_id"] == "big-1"
            assert "exceeds the" in r["message"]
            sock.send(msgpack.packb({"type": "health", "request_id": "h-1"}))  # same connection
            assert _recv(sock)["status"] == "ok"
        finally:
            sock.close()
            ctx.term()
        assert sum(1 for _ in stream) > 0  # the other stream runs to its end


@pytest.fixture(scope="module")
def http(model_dir, tmp_path_factory):
    s = HttpServe(model_dir, tmp_path_factory.mktemp("log") / "serve.log")
    yield s
    assert s.stop() == 0, s.log_tail()


def test_http_request_over_the_limit_fails_alone(http):
    """Issue 24, defect 2: a prompt over 1 MiB dropped the front end's one ZeroMQ link, froze every
    HTTP stream and hung itself for 600 s. Now it is refused and two running streams finish."""
    streams = [open_stream(http.port, "/v1/completions", {"prompt": p, "stream": True, **LONG})
               for p in PROMPTS[:2]]
    for _, resp in streams:
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
    status, body = post(http.url + "/v1/completions", {"prompt": "a" * 1048600, "max_tokens": 2},
                        timeout=60)
    assert status in (400, 413), body
    for conn, resp in streams:
        events = resp.read().strip().split(b"\n\n")
        conn.close()
        assert events[-1] == b"data: [DONE]"
        last = json.loads(events[-2][6:])
        assert "error" not in last and last["choices"][0]["finish_reason"] == "length", last
    assert post(http.url + "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200


def test_tokenizing_off_the_event_loop_keeps_a_stream_going(service):
    """Issue 24, defect 3: tokenizing and chat templating ran on the coordinator's event loop, so
    ten huge chat requests froze every stream. Here a chat request's tokenizing is held until the
    running stream has received 5 more tokens: on the event loop that could never happen."""
    s = service
    with Client(s.endpoint, timeout=120) as c:
        tok = s.svc.coordinator.tokenizer
        got, progressed = [], threading.Event()
        real = tok.encode_chat

        def held(messages):
            start = len(got)
            for _ in range(600):  # up to 60 s for the stream to move on
                if len(got) >= start + 5:
                    progressed.set()
                    break
                threading.Event().wait(0.1)
            return real(messages)

        stream = c.stream_messages(PROMPTS[0], **LONG)
        got.append(next(stream))
        reader = threading.Thread(target=lambda: got.extend(stream), daemon=True)
        reader.start()
        tok.encode_chat = held
        try:
            with Client(s.endpoint, timeout=120) as other:
                f = other.generate(messages=[{"role": "user", "content": "hi"}] * 10, max_tokens=2)
        finally:
            tok.encode_chat = real
        assert progressed.is_set(), "the stream got no tokens while a chat request was tokenized"
        assert f.completion_tokens == 2
        reader.join(120)
        assert got[-1].finish_reason == "length"


def test_a_prompt_too_long_for_any_context_is_refused_before_tokenizing(service, monkeypatch):
    """The length is checked first, from characters: ten pipelined chat requests of 20,000
    messages (the issue's repro) are refused without being tokenized, and a stream goes on."""
    s = service
    with Client(s.endpoint, timeout=120) as c:
        co = s.svc.coordinator
        calls = []
        real = co.tokenizer.encode_chat
        monkeypatch.setattr(co.tokenizer, "encode_chat", lambda m: calls.append(len(m)) or real(m))
        stream = c.stream_messages(PROMPTS[0], **LONG)
        next(stream)
        ctx = zmq.Context()
        sock = _dealer(ctx, s.endpoint)
        try:
            huge = [{"role": "user", "content": "hi"}] * 20_000
            for i in range(10):
                sock.send(msgpack.packb({"type": "generate", "request_id": f"huge-{i}", "messages": huge}))
            replies = [_recv(sock) for _ in range(10)]
        finally:
            sock.close()
            ctx.term()
        assert {r["code"] for r in replies} == {"bad_request"}
        assert all("characters cannot fit" in r["message"] for r in replies), replies[0]
        assert calls == [], "a prompt too long for the context was tokenized"
        assert sum(1 for _ in stream) > 0
