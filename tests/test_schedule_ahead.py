"""A decode pass scheduled ahead through the real service (CPU backend, real processes and
sockets, the tiny model all resident): `gdsllm serve` with the next pass sent before the last
one's tokens are back gives exactly what it gives without (--no-schedule-ahead) and what
gdsllm.LLM gives: greedy and seeded tokens, batch 1 and concurrent requests, stop strings, stop
ids and max_tokens (the token a finished sequence got in the pass ahead never reaches a client),
and a cancel while a pass is ahead. The scheduler's rule alone: tests/test_scheduler.py."""
from __future__ import annotations

import asyncio
import time

import pytest

from gdsllm.service.client import AsyncClient, Client
from service_helpers import N, PROMPTS, Service, model_dir, reference  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def services(model_dir):
    """(ahead, sync): the same all-resident service with and without the pass ahead."""
    with Service(model_dir) as on, Service(model_dir, schedule_ahead=False) as off:
        yield on, off


def batch(s: Service):
    return s.svc.coordinator.batch


def test_greedy_and_seeded_tokens_equal_llm_at_batch_1(services, reference):
    on, off = services
    before = batch(on).passes_ahead
    for s in services:
        with Client(s.endpoint, timeout=30) as c:
            for p in PROMPTS[:3]:
                f = c.generate(p, max_tokens=N, temperature=0)
                assert (f.token_ids, f.finish_reason) == (reference[p][:N], "length"), p
            f = c.generate(PROMPTS[0], max_tokens=N, temperature=0.9, seed=1234)
            assert f.token_ids == reference["seeded"]
    # every decode pass but the first of each request went ahead; never without it
    assert batch(on).passes_ahead - before == 4 * (N - 2) and batch(off).passes_ahead == 0


async def test_concurrent_requests_equal_llm(services, reference):
    async def one(s, i, p):
        async with AsyncClient(s.endpoint, timeout=60) as c:  # each its own max_tokens
            return await c.generate(p, max_tokens=N - i, temperature=0)

    for s in services:
        before = batch(s).passes_ahead
        got = await asyncio.gather(*(one(s, i, p) for i, p in enumerate(PROMPTS[:6])))
        for i, (p, f) in enumerate(zip(PROMPTS, got)):
            assert (f.token_ids, f.finish_reason, f.completion_tokens) == \
                (reference[p][:N - i], "length", N - i), p
        assert (batch(s).passes_ahead > before) == (s is services[0])


def streamed(c: Client, prompt: str, **params):
    """(the streamed token ids, the streamed text, the Final)."""
    msgs = list(c.stream_messages(prompt, temperature=0, **params))
    return [t for m in msgs[:-1] for t in m.token_ids], "".join(m.text for m in msgs[:-1]), msgs[-1]


def test_stop_strings_stop_ids_and_max_tokens_leak_nothing(services, reference):
    from gdsllm.engine.tokenizer import Tokenizer
    from gdsllm.format.metadata import load_model_meta
    on, off = services
    tok = Tokenizer(load_model_meta(on.svc.config.model))
    ids = reference[PROMPTS[1]][:N]
    full = tok.decode(ids)
    cases = [dict(max_tokens=N, stop=[full[len(full) // 2: len(full) // 2 + 2]]),
             dict(max_tokens=N, stop_token_ids=[ids[4]]),
             dict(max_tokens=3), dict(max_tokens=1)]
    for params in cases:
        got = []
        for s in services:
            with Client(s.endpoint, timeout=30) as c:
                toks, text, final = streamed(c, PROMPTS[1], **params)
            # nothing after the end (a last token that adds no text is not streamed)
            assert toks == final.token_ids[:len(toks)] and text == final.text, params
            got.append((toks, text, final.token_ids, final.finish_reason, final.completion_tokens))
        assert got[0] == got[1], params
    # what they give: cut where LLM cuts (test_service checks these against LLM)
    stop_id = ids[4]
    assert got_ids(on, PROMPTS[1], stop_token_ids=[stop_id]) == ids[: ids.index(stop_id) + 1]
    assert got_ids(on, PROMPTS[1], max_tokens=3) == ids[:3]


def got_ids(s: Service, prompt: str, **params) -> list[int]:
    with Client(s.endpoint, timeout=30) as c:
        return c.generate(prompt, temperature=0, **{"max_tokens": N, **params}).token_ids


def test_cancel_while_a_pass_is_ahead(services, reference):
    on, _ = services
    before = batch(on).passes_ahead
    with Client(on.endpoint, timeout=30) as c:
        msgs = c.stream_messages(PROMPTS[1], max_tokens=400, temperature=0, request_id="to-cancel")
        seen = [next(msgs) for _ in range(3)]
        assert batch(on).passes_ahead > before  # from now on a pass is ahead all the time
        c.cancel("to-cancel")
        rest = list(msgs)
        final = rest[-1]
        toks = [t for m in seen + rest[:-1] for t in m.token_ids]
        assert final.finish_reason == "cancelled" and final.completion_tokens < 400
        assert toks == final.token_ids == reference[PROMPTS[1]][:len(toks)]  # no token leaked
        deadline = time.monotonic() + 10
        while batch(on).kv_bytes()[1] and time.monotonic() < deadline:  # the pass ahead ends
            time.sleep(0.05)
        assert batch(on).kv_bytes()[1] == 0 and not batch(on).core.deferred
        assert c.generate(PROMPTS[2], max_tokens=N, temperature=0).token_ids == reference[PROMPTS[2]][:N]
