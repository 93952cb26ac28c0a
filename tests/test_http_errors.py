"""The OpenAI-compatible HTTP API of a real `gdsllm serve --http-port` process when things go
wrong: every error status (400, 401, 404, 429, 503) with OpenAI's error body, and cancellation of a
request whose client hung up (the coordinator counts it as cancelled).

    python3 -m pytest -q tests/test_http_errors.py
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import threading
from pathlib import Path

import openai
import pytest

from http_api_helpers import AUTH, CHAT, LONG, PROMPT, model, oai, server  # noqa: F401  (fixtures)
from http_helpers import HttpServe, get, open_stream, post, scrape, wait_for


def error_of(exc_info) -> dict:
    body = exc_info.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# ------------------------------------------------------------------ errors


def test_400_bad_requests(server, oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="tiny", prompt=PROMPT, temperature=-1)
    assert "temperature" in error_of(e)["message"] and error_of(e)["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny", messages=CHAT, n=2)
    assert error_of(e)["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    assert error_of(e)["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="tiny", prompt="word " * 600, max_tokens=4)
    assert "context" in error_of(e)["message"]
    with pytest.raises(openai.BadRequestError) as e:  # refused before the stream starts: a status
        oai.completions.create(model="tiny", prompt=PROMPT, top_p=0, stream=True)
    assert "top_p" in error_of(e)["message"]
    status, body = post(server.url + "/v1/completions", b"{not json", AUTH)
    assert status == 400 and "parse the JSON" in body["error"]["message"]
    status, body = post(server.url + "/v1/completions", {"model": "tiny"}, AUTH)
    assert status == 400 and body["error"]["param"] == "prompt"


def test_401_without_or_with_a_wrong_key(server):
    for key in ("wrong-key", ""):
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=key or "unused", max_retries=0,
                          default_headers={} if key else {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as e:
            c.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
        assert e.value.status_code == 401 and error_of(e)["code"] == "invalid_api_key"
    status, body = get(server.url + "/v1/models")
    assert status == 401 and "Missing API key" in body["error"]["message"]
    import urllib.request
    with urllib.request.urlopen(server.url + "/", timeout=30) as r:  # the page itself is open;
        assert r.status == 200 and b"<html" in r.read()           # its requests carry the key


def test_404_unknown_model_and_route(server, oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert error_of(e)["code"] == "model_not_found" and "gpt-4o" in error_of(e)["message"]
    status, body = get(server.url + "/v1/nowhere", AUTH)
    assert status == 404 and body["error"]["message"] == "Invalid URL (GET /v1/nowhere)"


def test_429_when_the_coordinator_queue_is_full(server, oai):
    """--max-batch 1 --max-waiting 1: one request runs, one waits, the next is refused (busy)."""
    conn, resp = open_stream(server.port, "/v1/completions", {"prompt": PROMPT, "stream": True, **LONG}, AUTH)
    try:
        assert resp.status == 200 and resp.readline().startswith(b"data: ")  # running
        waiting = {}
        t = threading.Thread(target=lambda: waiting.update(r=oai.completions.create(
            model="tiny", prompt="x y", max_tokens=3, temperature=0)))
        t.start()
        wait_for(lambda: get(server.url + "/health")[1]["requests_waiting"] == 1, "for a waiting request")
        with pytest.raises(openai.RateLimitError) as e:
            oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
        assert e.value.status_code == 429 and error_of(e)["code"] == "queue_full"
        assert e.value.response.headers["retry-after"] == "1"
    finally:
        conn.close()  # hang up: the running request is cancelled, the waiting one runs
    t.join(120)
    assert waiting["r"].usage.completion_tokens == 3


def cancelled(server) -> float:
    return scrape(server.metrics_port)[("gdsllm_requests_total", (("finish_reason", "cancelled"),))]


def test_client_disconnect_mid_stream_cancels_the_request(server):
    before = cancelled(server)
    conn, resp = open_stream(server.port, "/v1/chat/completions",
                             {"messages": CHAT, "stream": True, **LONG}, AUTH)
    assert resp.status == 200 and resp.readline().startswith(b"data: ")  # the first event
    wait_for(lambda: get(server.url + "/health")[1]["requests_running"] == 1, "for the request to run")
    conn.sock.shutdown(2)
    conn.close()
    wait_for(lambda: cancelled(server) == before + 1, "for the coordinator to cancel", timeout=30)
    assert get(server.url + "/health")[1]["requests_running"] == 0
    s = scrape(server.metrics_port)
    assert s[("gdsllm_http_requests_total", (("route", "/v1/chat/completions"), ("status", "200")))] >= 1


def test_client_disconnect_before_a_full_answer_cancels_it(server):
    """Not streamed: the client leaves while the whole answer is being made (499 in the metrics)."""
    before = cancelled(server)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, **LONG}),
                 {"Content-Type": "application/json", **AUTH})
    wait_for(lambda: get(server.url + "/health")[1]["requests_running"] == 1, "for the request to run")
    conn.sock.shutdown(2)
    conn.close()
    wait_for(lambda: cancelled(server) == before + 1, "for the coordinator to cancel", timeout=30)
    key = ("gdsllm_http_requests_total", (("route", "/v1/completions"), ("status", "499")))
    wait_for(lambda: scrape(server.metrics_port).get(key, 0) >= 1, "for the 499 to be counted")


@pytest.mark.slow
def test_503_while_loading_and_when_degraded(model, tmp_path):
    s = HttpServe(model, tmp_path / "serve.log", "--restart-limit", "0", wait=False)  # no restart
    try:
        # The HTTP port is bound before the model loads: the first answer is "loading". A tiny
        # model loads in a moment, so the first worker is held (SIGSTOP) as soon as it exists,
        # and "loading" lasts until the test lets it go (without that, a loaded machine raced it).
        first = wait_for(lambda: _workers(s)[:1], "for a worker process", timeout=120, proc=s.proc)[0]
        os.kill(first, signal.SIGSTOP)
        try:
            status = wait_for(lambda: _try_post(s), "for the HTTP port", timeout=120, proc=s.proc)
        finally:
            os.kill(first, signal.SIGCONT)
        code, body = status
        assert code == 503, body
        assert body["error"]["code"] == "service_unavailable" and "loading" in body["error"]["message"]
        s.wait_ready()
        conn, resp = open_stream(s.port, "/v1/completions", {"prompt": PROMPT, "stream": True, **LONG})
        assert resp.readline().startswith(b"data: ")
        workers = _workers(s)
        assert len(workers) == 2, workers  # the I/O and the compute worker
        os.kill(workers[-1], signal.SIGKILL)
        # The stream already had its 200: the failure comes as an error event, then [DONE].
        rest = resp.read().strip().split(b"\n\n")
        assert rest[-1] == b"data: [DONE]", rest
        events = [json.loads(e[6:]) for e in rest[:-1]]
        conn.close()
        assert events[-1]["error"]["code"] == "service_unavailable" and "died" in events[-1]["error"]["message"]
        wait_for(lambda: get(s.url + "/health")[0] == 503, "for /health to report degraded")
        status, h = get(s.url + "/health")
        assert h["status"] == "degraded" and "died" in h["detail"]
        status, body = post(s.url + "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2})
        assert status == 503 and body["error"]["type"] == "server_error" and "died" in body["error"]["message"]
    finally:
        rc = s.stop()
    assert rc == 0, s.log_tail()


def _workers(s: HttpServe) -> list[int]:
    """The server's worker processes (multiprocessing spawn children), oldest first."""
    out = []
    for pid in s.children():
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:
            pass  # exited meanwhile
    return out


def _try_post(s: HttpServe):
    try:
        return post(s.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 2}, timeout=30)
    except OSError:
        return None
