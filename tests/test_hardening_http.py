"""The HTTP API against the outside attack of issue 24, on real `gdsllm serve --http-port`
processes over real sockets: one request's parameters or body never fail another's, bad input
gets 400 with one line (never 500 and a traceback), a web page cannot reach the API (Host,
Origin, JSON content type), each caller has its own in-flight cap, idle sockets are closed, and
the key stays out of `ps`.

    python3 -m pytest -q tests/test_hardening_http.py
"""
from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from http_api_helpers import CHAT, LONG, PROMPT, model  # noqa: F401  (fixtures)
from http_helpers import ROOT, HttpServe, free_port, get, open_stream, post, wait_for


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    """No key, loopback; batches of 4 (a bad request would share the batch of a good one); one
    request in flight per caller; a request head must come within 1 s."""
    s = HttpServe(model, tmp_path_factory.mktemp("log") / "serve.log", "--max-batch", "4",
                  "--max-inflight-per-client", "1", "--http-header-timeout", "1")
    yield s
    rc = s.stop()
    assert rc == 0, s.log_tail()
    assert "Traceback" not in s.log_path.read_text(errors="replace"), s.log_tail()


def raw_post(port: int, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one POST sent as given (Host, Content-Type included)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}"), dict(r.getheaders())
    finally:
        conn.close()


def finish(resp) -> list[dict]:
    """The events of a stream until [DONE] (an error event is returned like any other)."""
    events = []
    for line in resp:
        if line.startswith(b"data: [DONE]"):
            return events
        if line.startswith(b"data: "):
            events.append(json.loads(line[6:]))
    raise AssertionError(f"the stream ended without [DONE] after {events[-3:]}")


def long_stream(port: int, headers: dict | None = None):
    conn, resp = open_stream(port, "/v1/completions", {"prompt": PROMPT, "stream": True, "seed": 1,
                                                       "temperature": 0.8, **LONG}, headers)
    assert resp.status == 200, resp.read()
    assert resp.readline().startswith(b"data: ")  # running
    return conn, resp


def assert_served_whole(resp) -> None:
    events = finish(resp)
    assert not any("error" in e for e in events), events[-1]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


# ------------------------------------------------------------------ one request cannot fail others


def test_tiny_temperature_or_top_p_fails_only_its_request(server):
    """Defect 1: temperature 1e-300 was 0 in float32 (logits / 0: NaN) and failed every request
    of the batch; now it is refused (400) and the stream beside it (a ZeroMQ client's, so that
    no per-client cap stands between them) runs to its end."""
    from gdsllm.service.client import Client
    with Client(server.endpoint, timeout=120) as c:
        replies = c.stream_messages(PROMPT, seed=1, temperature=0.8, **LONG)
        next(replies)  # running
        for kw in ({"temperature": 1e-300}, {"top_p": 1e-300}, {"temperature": 1e300}):
            status, body = post(server.url + "/v1/completions", {"prompt": "x", "max_tokens": 2, **kw})
            assert status == 400 and "float32" in body["error"]["message"], (kw, body)
        final = list(replies)[-1]
        assert final.finish_reason == "length" and final.completion_tokens == LONG["max_tokens"]


def test_a_body_over_the_limit_gets_413_and_the_others_go_on(server):
    """Defect 2: a prompt over 1 MiB dropped the front end's ZeroMQ link (every stream froze);
    now the body limit, below what that link carries, answers 413 before it."""
    from gdsllm.service.http.app import MAX_BODY_BYTES
    conn, resp = long_stream(server.port)
    try:
        big = json.dumps({"prompt": "a" * (MAX_BODY_BYTES + 100), "max_tokens": 2}).encode()
        status, body, _ = raw_post(server.port, "/v1/completions", big)
        assert status == 413 and body["error"]["code"] == "request_too_large", body
        assert_served_whole(resp)
    finally:
        conn.close()
    status, body = post(server.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_the_largest_body_fits_the_zeromq_request_limit():
    """Any body the HTTP API accepts becomes a Generate within MAX_REQUEST_BYTES (msgpack never
    takes more than the JSON, plus the fields the front end adds)."""
    from gdsllm.service.client import _request  # noqa: PLC2701  (the Generate the front end sends)
    from gdsllm.service.http.app import MAX_BODY_BYTES
    from gdsllm.service.http.openai import parse_request
    from ipc.codec import MAX_FRAME_BYTES, MAX_REQUEST_BYTES, encode
    assert MAX_BODY_BYTES < MAX_REQUEST_BYTES < MAX_FRAME_BYTES
    one = {"role": "user", "content": ""}
    n = (MAX_BODY_BYTES - 400) // (len(json.dumps(one, separators=(",", ":"))) + 1)  # and a comma
    worst = [
        {"prompt": "\u00e9" * ((MAX_BODY_BYTES - 100) // 2)},
        {"messages": [one] * n, "stop_token_ids": [0] * 64, "temperature": 0, "top_p": 1, "seed": 0},
    ]
    for body in worst:
        raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        assert len(raw) <= MAX_BODY_BYTES
        req = parse_request(body, chat="messages" in body)
        msg = _request(req.prompt, req.messages, "chatcmpl-" + "f" * 32,
                       {**req.params, "caller": "conn:[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"})
        assert len(encode(msg)) <= MAX_REQUEST_BYTES, (len(raw), len(encode(msg)))


# ------------------------------------------------------------------ bad input: 400, one line


BAD_BODIES = {
    "max_tokens 2^64": b'{"prompt": "x", "max_tokens": 18446744073709551616}',
    "seed 2^64": b'{"prompt": "x", "seed": 18446744073709551616}',
    "top_k 2^64": b'{"prompt": "x", "top_k": 18446744073709551616}',
    "stop_token_ids 2^64": b'{"prompt": "x", "stop_token_ids": [18446744073709551616]}',
    "seed below -2^63": b'{"prompt": "x", "seed": -9223372036854775809}',
    "seed -2^63": b'{"prompt": "x", "seed": -9223372036854775808}',  # int64, but not a seed
    "temperature 10^400": b'{"prompt": "x", "temperature": 1' + b"0" * 400 + b"}",
    "an integer of 5000 digits": b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
    "a lone surrogate": b'{"prompt": "x\\ud800y"}',
    "a lone surrogate in a name": b'{"prompt": "x", "model": "\\udc00"}',
    "nested 100k deep": b'{"prompt": "x", "stop": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_values_get_400_with_one_line(server, case):
    """Defect 8: these were 500 with a traceback in the log (the fixture checks the log)."""
    status, body, _ = raw_post(server.port, "/v1/completions", BAD_BODIES[case])
    msg = body["error"]["message"]
    assert status == 400 and "\n" not in msg and len(msg) < 400, (case, status, body)


# ------------------------------------------------------------------ cross-site requests


def test_a_foreign_host_origin_or_content_type_is_refused(server):
    """Defect 5: a text/plain POST with `Host: evil.example` ran a generation (DNS rebinding,
    form posts from any page)."""
    body = json.dumps({"prompt": PROMPT, "max_tokens": 1}).encode()
    status, err, _ = raw_post(server.port, "/v1/completions", body, {"Host": "evil.example"})
    assert status == 400 and err["error"]["code"] == "host_not_allowed", err
    assert get(server.url + "/health", {"Host": f"evil.example:{server.port}"})[0] == 400
    for origin in ("http://evil.example", "null", f"http://evil.example:{server.port}"):
        status, err, _ = raw_post(server.port, "/v1/completions", body, {"Origin": origin})
        assert status == 403 and err["error"]["code"] == "origin_not_allowed", (origin, err)
    for ctype in ("text/plain", "application/x-www-form-urlencoded", ""):
        status, err, _ = raw_post(server.port, "/v1/completions", body, {"Content-Type": ctype})
        assert status == 415 and err["error"]["code"] == "unsupported_media_type", (ctype, err)
    # what the chat page and API clients send is served
    for headers in ({"Host": f"localhost:{server.port}"}, {"Origin": server.url},
                    {"Origin": f"http://localhost:{server.port}"},
                    {"Content-Type": "application/json; charset=utf-8"}):
        status, out, _ = raw_post(server.port, "/v1/completions", body, headers)
        assert status == 200 and out["usage"]["completion_tokens"] == 1, (headers, out)


def test_a_public_http_host_needs_a_key_or_insecure(model, tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "GDSLLM_API_KEY"}
    out = subprocess.run([sys.executable, "-m", "gdsllm", "serve", "-m", str(model), "--device", "cpu",
                          "--http-host", "0.0.0.0", "--http-port", str(free_port()), "--metrics-port", "-1"],
                         cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1 and "--insecure" in out.stderr and "--api-key-file" in out.stderr
    assert "Traceback" not in out.stderr


def test_keys_from_the_environment_and_a_file(tmp_path, monkeypatch):
    import argparse

    from gdsllm.commands.serve import add_parser, http_options
    (tmp_path / "keys").write_text("# one key per caller\nalpha-1\n\n  beta-2  \n")
    monkeypatch.setenv("GDSLLM_API_KEY", "from-env")
    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    args = sub.choices["serve"].parse_args(["--http-port", "0", "--api-key-file", str(tmp_path / "keys"),
                                            "--http-host", "0.0.0.0"])
    assert http_options(args).api_keys == ("from-env", "alpha-1", "beta-2")
    (tmp_path / "empty").write_text("# nothing\n")
    args = sub.choices["serve"].parse_args(["--http-port", "0", "--api-key-file", str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="no key in it"):
        http_options(args)


# ------------------------------------------------------------------ per-caller caps


def test_without_a_key_each_connection_has_its_own_cap(server):
    """Defect 4: the cap counted the whole front end as one client: one caller holding its
    requests got everyone else 429. --max-inflight-per-client 1 here."""
    conn, resp = long_stream(server.port)
    try:
        status, body = post(server.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
        assert status == 200 and body["usage"]["completion_tokens"] == 2, body
        assert_served_whole(resp)
    finally:
        conn.close()


def test_with_keys_each_key_has_its_own_cap_and_stays_out_of_ps(model, tmp_path):
    (tmp_path / "keys").write_text("key-of-alice\nkey-of-bob\n")
    s = HttpServe(model, tmp_path / "serve.log", "--max-inflight-per-client", "1", "--max-batch", "4",
                  "--api-key-file", str(tmp_path / "keys"))
    alice, bob = ({"Authorization": f"Bearer key-of-{n}"} for n in ("alice", "bob"))
    try:
        for pid in [s.proc.pid, *s.children()]:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert b"key-of-" not in cmdline
        conn, resp = long_stream(s.port, alice)
        try:
            status, body = post(s.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 2}, alice)
            assert status == 429 and body["error"]["code"] == "queue_full", body
            status, body = post(s.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 2}, bob)
            assert status == 200 and body["usage"]["completion_tokens"] == 2, body
            assert post(s.url + "/v1/completions", {"prompt": PROMPT})[0] == 401
            assert_served_whole(resp)
        finally:
            conn.close()
    finally:
        assert s.stop() == 0, s.log_tail()


# ------------------------------------------------------------------ smaller items (defect 9)


def test_a_connection_that_sends_no_request_is_closed(server):
    """--http-header-timeout 1: an idle socket, and one that sends half a request head."""
    for first in (b"", b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(first)
            assert sock.recv(4096) == b""  # closed by the server, long before the 30 s
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:  # kept alive: each request on it has its own deadline, then it is closed too
        for _ in range(2):
            conn.request("GET", "/health")
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read())["status"] == "ok"
        assert conn.sock.recv(4096) == b""
    finally:
        conn.close()


def test_405_carries_allow(server):
    r = urllib_request("GET", server.url + "/v1/completions")
    assert r.status == 405 and r.headers["Allow"] == "POST"


def urllib_request(method: str, url: str):
    import urllib.error
    import urllib.request
    try:
        return urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=30)
    except urllib.error.HTTPError as e:
        return e


def test_health_does_not_echo_a_long_request_id(server):
    """A ZeroMQ Health with a 10,000-character id got it back; ids are 1 to 128 characters."""
    import zmq

    from ipc.codec import decode
    import msgpack
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.connect(server.endpoint)
        sock.send(msgpack.packb({"type": "health", "request_id": "x" * 10_000}))
        assert sock.poll(30_000)
        reply = decode(sock.recv())
        assert type(reply).__name__ == "Error" and reply.code == "bad_request", reply
        assert len(reply.request_id) <= 128 and len(reply.message) < 400
    finally:
        sock.close(linger=0)
        ctx.term()
    wait_for(lambda: get(server.url + "/health")[0] == 200, "for /health")
