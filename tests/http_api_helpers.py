"""Shared by the OpenAI API tests (test_http.py, test_http_errors.py): a tiny model, one real
`gdsllm serve --http-port` per module (one request at a time, one more may wait, an API key), the
official `openai` client on it, the ZeroMQ client's answer to compare with, and the requests used.

    from http_api_helpers import KEY, PROMPT, model, oai, server, zmq_final  # noqa: F401  (fixtures)
"""
from __future__ import annotations

import openai
import pytest

from gdsllm.service.client import Client
from http_helpers import HttpServe

KEY = "test-key-1234"
AUTH = {"Authorization": f"Bearer {KEY}"}
N = 12
PROMPT = "once upon a time there was"
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
LONG = {"max_tokens": 480, "ignore_eos": True}  # runs for seconds on the tiny model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from gdsllm.convert.synth import synth
    return synth(tmp_path_factory.mktemp("http") / "tiny", shape="tiny", layers=4, dtype="float32", seed=7)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    """One request at a time, one more may wait, an API key."""
    s = HttpServe(model, tmp_path_factory.mktemp("log") / "serve.log", "--max-batch", "1",
                  "--max-waiting", "1", "--api-key", KEY)
    yield s
    rc = s.stop()
    assert rc == 0, s.log_tail()


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def zmq_final(server, **kw):
    with Client(server.endpoint, timeout=120) as c:
        return c.generate(**kw)
