"""The streaming service (real worker processes and sockets) against bad input: every malformed or
invalid request gets an error reply and the server serves on; a client that vanishes mid-stream
has its request cancelled; a client with no server times out with a clear message.
"""
from __future__ import annotations

import time

import msgpack
import pytest
import zmq

from gdsllm.service.client import Client
from ipc.codec import MAX_FRAME_BYTES
from service_helpers import (N, PROMPTS, model_dir, raw_exchange, reference,  # noqa: F401 (fixtures)
                             server)


def gen(**kw):
    d = {"type": "generate", "request_id": "r1", "prompt": "hello", "max_tokens": 4}
    d.update(kw)
    return msgpack.packb(d)


BAD = {
    "garbage": b"\xc1\xff\x00garbage",
    "not a map": msgpack.packb([1, 2, 3]),
    "unknown type": msgpack.packb({"type": "launch_missiles", "request_id": "r1"}),
    "worker message": msgpack.packb({"type": "shutdown"}),
    "wrong field type": gen(max_tokens="ten"),
    "unknown field": gen(colour="blue"),
    "prompt and messages": gen(messages=[{"role": "user", "content": "x"}]),
    "oversized message": gen(prompt="x" * (1 << 20)),  # an error reply (the link stays)
    "oversized frame": gen(prompt="x" * MAX_FRAME_BYTES),  # dropped with its connection
    "prompt past the context": gen(prompt=" ".join(["word"] * 2000)),
    "empty prompt": gen(prompt=""),
    "bad role": gen(prompt=None, messages=[{"role": "wizard", "content": "x"}]),
    "negative temperature": gen(temperature=-1.0),
    "nan temperature": gen(temperature=float("nan")),
    "tiny temperature": gen(temperature=1e-300),  # 0 in float32: logits / 0, NaN in every row
    "subnormal temperature": gen(temperature=1e-40),
    "huge temperature": gen(temperature=1e300),
    "tiny top_p": gen(top_p=1e-300),
    "top_p zero": gen(top_p=0.0),
    "negative top_k": gen(top_k=-3),
    "zero max_tokens": gen(max_tokens=0),
    "huge seed": gen(seed=2**64 - 1),
    "empty stop string": gen(stop=[""]),
    "negative stop token id": gen(stop_token_ids=[-1]),
    "stop token id not an integer": gen(stop_token_ids=["2"]),
    "too many stop token ids": gen(stop_token_ids=list(range(65))),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_an_error_and_the_server_serves_on(server, reference, case):
    if case == "oversized frame":  # zmq.MAXMSGSIZE: the sender is disconnected, never buffered
        with pytest.raises(AssertionError, match="no reply"):
            raw_exchange(server.endpoint, BAD[case], timeout=2.0)
        with Client(server.endpoint, timeout=30) as c:
            assert c.generate(PROMPTS[4], max_tokens=N, temperature=0).token_ids == reference[PROMPTS[4]][:N]
        return
    reply = raw_exchange(server.endpoint, BAD[case])
    assert reply["type"] == "error" and reply["code"] == "bad_request", reply
    assert reply["message"]
    if case not in ("garbage", "not a map", "unknown type", "worker message"):
        assert reply["request_id"] == "r1"
    with Client(server.endpoint, timeout=30) as c:
        assert c.generate(PROMPTS[4], max_tokens=N, temperature=0).token_ids == reference[PROMPTS[4]][:N]


def test_client_vanishing_mid_stream_is_cancelled(server, reference):
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(server.endpoint)
    s.send(gen(request_id="gone", max_tokens=300, temperature=0.0))
    assert s.poll(10_000)
    s.close()  # vanishes mid-stream
    ctx.term()
    with Client(server.endpoint, timeout=30) as c:
        deadline = time.time() + 30
        while c.health().requests_running and time.time() < deadline:
            time.sleep(0.05)
        assert c.health().requests_running == 0, "the vanished client's request kept running"
        assert c.generate(PROMPTS[6], max_tokens=N, temperature=0).token_ids == reference[PROMPTS[6]][:N]


def test_client_timeout_is_clear():
    with Client("tcp://127.0.0.1:9", timeout=0.3) as c, pytest.raises(TimeoutError, match="gdsllm serve"):
        c.health()


def test_a_row_that_cannot_be_sampled_fails_only_its_request(tmp_path):
    """A model whose logits are NaN (a poisoned head): a sampled request gets an error naming
    why, while a greedy request sharing its passes (an argmax, whatever the logits) runs to its
    end, and the service serves on. Before, the whole pass failed, with every request in it."""
    import asyncio

    import torch

    from gdsllm.convert.synth import synth_params, synth_units
    from gdsllm.convert.synth_tokenizer import CHAT_TEMPLATE, synth_tokenizer_json
    from gdsllm.convert.writer import ModelWriter
    from gdsllm.service.client import AsyncClient, ServiceError
    from service_helpers import Service
    p = synth_params("tiny", 2)
    with ModelWriter(tmp_path / "nan", p, "float32", chat_template=CHAT_TEMPLATE, source="test") as w:
        for _, kind, tensors in synth_units(p, 0, "float32"):
            if kind == "head":
                tensors = {k: torch.full_like(v, float("nan")) if k == "lm_head.weight" else v
                           for k, v in tensors.items()}
            w.add_unit(tensors)
        w.add_file("tokenizer.json", synth_tokenizer_json(p.vocab_size), tokenizer=True)

    async def scenario(endpoint):
        async with AsyncClient(endpoint, timeout=60) as c:
            greedy = c.stream_messages("once upon", max_tokens=40, temperature=0, ignore_eos=True)
            await greedy.__anext__()  # running
            with pytest.raises(ServiceError) as e:
                await c.generate("a time", max_tokens=4, temperature=0.8, seed=1)
            return [m async for m in greedy][-1], e.value

    with Service(tmp_path / "nan", max_batch=4) as s:
        final, err = asyncio.run(scenario(s.endpoint))
        assert err.code == "internal" and "not finite" in err.message, err
        assert final.finish_reason == "length" and final.completion_tokens == 40
        with Client(s.endpoint, timeout=30) as c:
            assert c.generate("again", max_tokens=3, temperature=0, ignore_eos=True).completion_tokens == 3
            assert c.health().status == "ok"
