"""The OpenAI-compatible HTTP API of a real `gdsllm serve --http-port` process, through the
official `openai` package, curl and the CLI: the same greedy text as the ZeroMQ client, sampling
parameters and stop strings, and SSE framing. Error statuses and cancellation: test_http_errors.py.

    python3 -m pytest -q tests/test_http.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from http_api_helpers import (CHAT, KEY, N, PROMPT, model, oai, server,  # noqa: F401  (fixtures)
                              zmq_final)
from conftest import concurrently
from http_helpers import ROOT, get


# ------------------------------------------------------------------ answers


def test_models_and_health(server, oai):
    assert [m.id for m in oai.models.list().data] == ["tiny"]
    assert oai.models.retrieve("tiny").owned_by == "gdsllm"
    status, h = get(server.url + "/health")  # open without the key: it is for probes
    assert status == 200 and h["status"] == "ok" and h["model"] == "tiny" and h["backend"] == "cpu"


def test_completions_equal_the_zeromq_client(server, oai):
    ref = zmq_final(server, prompt=PROMPT, max_tokens=N, temperature=0)
    assert ref.completion_tokens == N and ref.text
    r = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=N, temperature=0)
    assert r.object == "text_completion" and r.model == "tiny" and len(r.choices) == 1
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (ref.prompt_tokens, N, ref.prompt_tokens + N)

    chunks = list(oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=N, temperature=0,
                                         stream=True))
    assert len(chunks) > 2 and {c.id for c in chunks} == {chunks[0].id}
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_equal_the_zeromq_client(server, oai):
    ref = zmq_final(server, messages=CHAT, max_tokens=N, temperature=0)
    r = oai.chat.completions.create(model="tiny", messages=CHAT, max_tokens=N, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == ref.prompt_tokens and r.usage.completion_tokens == N

    chunks = list(oai.chat.completions.create(model="tiny", messages=CHAT, max_tokens=N, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == N
    assert all(c.usage is None for c in chunks[:-1])


def test_sampling_parameters_reach_the_coordinator(server, oai):
    """seed, temperature and top_p as the ZeroMQ client sends them: the same sample; stop ends it."""
    kw = dict(max_tokens=N, temperature=0.9, top_p=0.9, seed=1234)
    ref = zmq_final(server, prompt=PROMPT, top_k=0, **kw)
    r = oai.completions.create(model="tiny", prompt=PROMPT, **kw)
    assert r.choices[0].text == ref.text
    # a stop string found inside the greedy text ends it just before
    greedy = zmq_final(server, prompt=PROMPT, max_tokens=N, temperature=0).text
    stop = next(greedy[i:i + 2] for i in range(2, len(greedy) - 1) if greedy[i:i + 2].strip())
    r = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=N, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == greedy[:greedy.index(stop)]


def test_sse_framing_with_curl(server):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": N, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    r = subprocess.run(["curl", "-sN", "-D", "-", "-H", f"Authorization: Bearer {KEY}", "-H",
                        "Content-Type: application/json", "-d", json.dumps(body),
                        server.url + "/v1/completions"], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    head, _, stream = r.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"content-type: text/event-stream" in head.lower()
    assert stream.endswith(b"\n\n")
    events = stream[:-2].split(b"\n\n")
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events), events
    assert events[-1] == b"data: [DONE]"
    objs = [json.loads(e[6:]) for e in events[:-1]]
    assert all(o["object"] == "text_completion" for o in objs)
    assert objs[-1]["choices"] == [] and objs[-1]["usage"]["completion_tokens"] == N
    text = "".join(o["choices"][0]["text"] for o in objs[:-1])
    assert text == zmq_final(server, prompt=PROMPT, max_tokens=N, temperature=0).text


# ------------------------------------------------------------------ the CLI over HTTP


def _cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gdsllm", *args], cwd=ROOT, input=stdin, text=True,
                          capture_output=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "GDSLLM_API_KEY": KEY})


@pytest.mark.slow
def test_generate_and_run_with_an_http_endpoint(server):
    ref = zmq_final(server, prompt=PROMPT, max_tokens=N, temperature=0)
    chat = zmq_final(server, messages=[{"role": "user", "content": "hi there"}], max_tokens=N,
                     temperature=0)
    generated, ran, r = concurrently(  # three client processes at once
        lambda: _cli("generate", "--endpoint", server.url, "-p", PROMPT, "-n", str(N), "--temp", "0"),
        lambda: _cli("run", "--endpoint", server.url, "-n", str(N), "--temp", "0", stdin="hi there\n"),
        lambda: _cli("generate", "--endpoint", server.url, "-p", PROMPT, "--api-key", "nope"))
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout == ref.text + "\n"
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == chat.text + "\n"
    assert r.returncode == 1 and "invalid_api_key" in r.stderr and "Traceback" not in r.stderr
