"""The HTTP front end's request rules and framing without a server: OpenAI bodies into coordinator
parameters (or a 400 naming the field), SSE events, the coordinator's error codes as statuses,
and the CLI's clear errors (a taken HTTP port, an unreachable endpoint).

    python3 -m pytest -q tests/test_http_openai.py
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from gdsllm.service.client import ServiceError
from gdsllm.service.http import openai, sse
from gdsllm.service.http.client import HttpClient, connect
from gdsllm.service.http.server import local_endpoint
from http_helpers import ROOT

MSG = [{"role": "user", "content": "hi"}]


def test_defaults_follow_openai():
    c = openai.parse_request({"prompt": "x"}, chat=False)
    assert c.params == dict(max_tokens=16, temperature=1.0, top_p=1.0, top_k=0, seed=None, stop=[],
                            stop_token_ids=[], ignore_eos=False, draft_tokens=None,
                            draft_tree=None)
    assert not c.stream and c.prompt == "x" and c.messages is None
    chat = openai.parse_request({"messages": MSG, "max_completion_tokens": 7, "stop": "\n",
                                 "top_k": -1, "stream": True, "stream_options": {"include_usage": True}},
                                chat=True)
    assert chat.params["max_tokens"] == 7 and chat.params["stop"] == ["\n"] and chat.params["top_k"] == 0
    assert openai.parse_request({"prompt": "x", "stop_token_ids": [2, 5]}, chat=False
                                ).params["stop_token_ids"] == [2, 5]  # vLLM's extension, onto the wire
    assert chat.stream and chat.include_usage
    assert openai.parse_request({"messages": MSG}, chat=True).params["max_tokens"] == openai.CHAT_MAX_TOKENS


def test_messages_roles_and_text_parts():
    req = openai.parse_request({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None}]}, chat=True)
    assert req.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a b"},
                            {"role": "assistant", "content": ""}]
    assert openai.parse_request({"prompt": ["only one"]}, chat=False).prompt == "only one"


@pytest.mark.parametrize("body, chat, param", [
    ([], False, None),
    ({"prompt": [1, 2, 3]}, False, "prompt"),
    ({"prompt": ["a", "b"]}, False, "prompt"),
    ({}, False, "prompt"),
    ({}, True, "messages"),
    ({"messages": []}, True, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, True,
     "messages[0].content"),
    ({"prompt": "x", "max_tokens": "8"}, False, "max_tokens"),
    ({"prompt": "x", "max_tokens": 8.5}, False, "max_tokens"),
    ({"prompt": "x", "temperature": True}, False, "temperature"),
    ({"prompt": "x", "temperature": float("nan")}, False, "temperature"),
    ({"prompt": "x", "stream": "yes"}, False, "stream"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, False, "stream_options"),
    ({"prompt": "x", "n": 3}, False, "n"),
    ({"prompt": "x", "logprobs": 2}, False, "logprobs"),
    ({"prompt": "x", "echo": True}, False, "echo"),
    ({"messages": MSG, "tools": [{"type": "function"}]}, True, "tools"),
    ({"messages": MSG, "presence_penalty": 0.5}, True, "presence_penalty"),
    ({"messages": MSG, "response_format": {"type": "json_object"}}, True, "response_format"),
    ({"prompt": "x", "stop": [1]}, False, "stop"),
    ({"prompt": "x", "stop_token_ids": ["2"]}, False, "stop_token_ids"),
    ({"prompt": "x", "stop_token_ids": 2}, False, "stop_token_ids"),
    ({"prompt": "x", "model": 3}, False, "model"),
    ({"prompt": "x", "draft_tokens": 1.5}, False, "draft_tokens"),
    ({"prompt": "x", "draft_tree": 1.5}, False, "draft_tree"),
])
def test_bad_bodies_are_400_naming_the_field(body, chat, param):
    with pytest.raises(openai.ApiError) as e:
        openai.parse_request(body, chat)
    assert e.value.status == 400 and e.value.param == param
    err = e.value.body()["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and err["param"] == param


def test_draft_tokens_per_request_reach_the_generate_message():
    """vLLM-style extra parameter: a request may ask for its own K (0: no drafting); the one rule
    for its range is the engine's (SamplingParams.validate), checked by the coordinator."""
    from gdsllm.engine.sampling import MAX_DRAFT_TOKENS, SamplingParams
    assert openai.parse_request({"prompt": "x", "draft_tokens": 2}, chat=False).params["draft_tokens"] == 2
    assert openai.parse_request({"prompt": "x"}, chat=False).params["draft_tokens"] is None
    with pytest.raises(ValueError, match=f"draft_tokens must be 0 to {MAX_DRAFT_TOKENS}"):
        SamplingParams(draft_tokens=MAX_DRAFT_TOKENS + 1).validate()


def test_draft_tree_per_request_reaches_the_generate_message():
    """A request may size its own token tree (0: a chain); the range is SamplingParams'."""
    from gdsllm.engine.sampling import MAX_DRAFT_TREE, SamplingParams
    assert openai.parse_request({"prompt": "x", "draft_tree": 64}, chat=False).params["draft_tree"] == 64
    with pytest.raises(ValueError, match=f"draft_tree must be 0 to {MAX_DRAFT_TREE}"):
        SamplingParams(draft_tree=MAX_DRAFT_TREE + 1).validate()


def test_neutral_values_of_unsupported_fields_and_unknown_fields_pass():
    req = openai.parse_request({"prompt": "x", "logprobs": None, "echo": False, "presence_penalty": 0,
                                "frequency_penalty": 0.0, "user": "me", "something_new": 1}, chat=False)
    assert req.prompt == "x"


@pytest.mark.parametrize("code, message, status", [
    ("bad_request", "request x: temperature must be >= 0", 400),
    ("busy", "4096 requests are already waiting", 429),
    ("worker_died", "request x failed: the compute worker died", 503),
    ("internal", "service degraded: layer_002.bin checksum", 503),
    ("internal", "the server is shutting down", 503),
    ("internal", "something else", 500),
])
def test_coordinator_errors_as_http_statuses(code, message, status):
    e = openai.service_error(ServiceError(code, message))
    assert e.status == status and e.message == message
    assert ("Retry-After" in e.headers()) == (status in (429, 503))


def test_sse_events_round_trip():
    objs = [{"a": "x\ny", "b": "é"}, {"c": None}]
    raw = b"".join(map(sse.event, objs)) + sse.DONE + sse.event({"after": "done"})
    assert all(line.startswith(b"data: ") for line in raw.split(b"\n\n") if line)
    assert list(sse.parse(raw.splitlines(keepends=True))) == objs
    with pytest.raises(ValueError, match="not a JSON event"):
        list(sse.parse([b"data: {oops\n"]))


def test_endpoint_scheme_picks_the_client_and_errors_are_clear():
    from gdsllm.service.client import Client
    with connect("tcp://127.0.0.1:9", timeout=1) as c:
        assert isinstance(c, Client)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with connect(f"http://127.0.0.1:{port}/v1", timeout=5) as c:
            assert isinstance(c, HttpClient) and c.prefix == ""
            with pytest.raises(ServiceError, match="cannot reach") as e:
                c.health()
            assert e.value.code == "unreachable"
    with pytest.raises(ValueError, match="not an HTTP endpoint"):
        HttpClient("http://")
    assert local_endpoint("tcp://0.0.0.0:5555") == "tcp://127.0.0.1:5555"
    assert local_endpoint("tcp://*:7") == "tcp://127.0.0.1:7" and local_endpoint("ipc:///x") == "ipc:///x"


def test_serve_on_a_taken_http_port_is_one_line(tmp_path):
    from gdsllm.convert.synth import synth
    model = synth(tmp_path / "m", shape="tiny", layers=1, seed=3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "gdsllm", "serve", "-m", str(model), "--device", "cpu",
                            "--metrics-port", "-1", "--endpoint", "tcp://127.0.0.1:0",
                            "--http-port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"cannot serve HTTP on 127.0.0.1:{port}" in r.stderr.strip().splitlines()[-1]
