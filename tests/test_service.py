"""The streaming service end to end on the CPU backend: real worker processes, real sockets, real
files. Greedy tokens through the pipeline equal the single-process gdsllm.LLM (which test_llm
checks against transformers; one test here checks transformers directly) for every budget from one
streamed slot to everything resident; streaming, batches, stop strings and ids, cancellation,
chat, seeds, the CLI and the metrics. Bad input and vanished clients: test_service_bad_input.py.
"""
from __future__ import annotations

import asyncio
import time

import msgpack
import pytest

from gdsllm.service.client import AsyncClient, Client
from service_helpers import (CHAT, N, PROMPTS, UNIT, Service, model_dir,  # noqa: F401 (fixtures)
                             raw_exchange, reference, server)


def budgets():
    e_h = 131072 + 135168
    cases = [(w, w * UNIT) for w in (1, 2, 3, 4)]  # everything streamed, W slots
    cases += [(1, e_h + 2 * UNIT + UNIT), (3, e_h + UNIT + 3 * UNIT), (2, None)]
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("window,budget", budgets())
def test_pipeline_tokens_equal_llm(model_dir, reference, window, budget):
    with Service(model_dir, vram_budget=budget, prefetch_window=window) as s, \
            Client(s.endpoint, timeout=30) as c:
        h = c.health()
        if budget == window * UNIT:
            assert h.resident_units == [] and h.streamed_units == 6 and h.prefetch_window == window
        if budget is None:
            assert h.streamed_units == 0 and len(h.resident_units) == 6
        for p in PROMPTS[:3]:
            f = c.generate(p, max_tokens=N, temperature=0)
            assert f.token_ids == reference[p][:N], f"prompt {p!r}, window {window}, budget {budget}"
            assert f.finish_reason == "length" and f.completion_tokens == N


def test_pipeline_equals_transformers(model_dir, server):
    import torch
    from transformers import LlamaForCausalLM

    from gdsllm.format.metadata import load_model_meta
    from gdsllm.engine.tokenizer import Tokenizer
    hf = LlamaForCausalLM.from_pretrained(model_dir.parent / "hf", dtype=torch.float32).eval()
    ids = Tokenizer(load_model_meta(model_dir)).encode(PROMPTS[3])
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    with Client(server.endpoint, timeout=30) as c:
        f = c.generate(PROMPTS[3], max_tokens=N, temperature=0)
    assert f.token_ids == out[0, len(ids):].tolist()


def test_stream_text_and_health(server, reference, model_dir):
    with Client(server.endpoint, timeout=30) as c:
        msgs = list(c.stream_messages(PROMPTS[0], max_tokens=N, temperature=0))
        final = msgs[-1]
        assert final.finish_reason == "length" and final.token_ids == reference[PROMPTS[0]][:N]
        assert "".join(m.text for m in msgs[:-1]) == final.text
        assert [t for m in msgs[:-1] for t in m.token_ids] == final.token_ids
        assert final.prompt_tokens > 0 and final.duration_s >= final.time_to_first_token_s > 0
        h = c.health()
    assert (h.status, h.backend, h.io_path) == ("ok", "cpu", "posix")
    assert h.model == str(model_dir) and h.resident_units == ["embed", "head"]
    assert h.streamed_units == 4 and h.prefetch_window == 2
    assert h.vram_budget_bytes == 131072 + 135168 + 2 * UNIT
    assert h.requests_running == 0 and h.requests_waiting == 0


async def test_eight_clients_at_once(server, reference):
    async def one(p):
        async with AsyncClient(server.endpoint, timeout=60) as c:
            return p, await c.generate(p, max_tokens=N, temperature=0)

    results = await asyncio.gather(*(one(p) for p in PROMPTS))
    for p, f in results:
        assert f.token_ids == reference[p][:N], f"prompt {p!r} in a batch of 8"


async def test_request_joining_mid_generation(server, reference):
    long_p, late_p = PROMPTS[3], PROMPTS[5]
    async with AsyncClient(server.endpoint, timeout=60) as c:
        seen, late = [], None
        async for msg in c.stream_messages(long_p, max_tokens=40, temperature=0):
            seen.append(msg)
            if len(seen) == 5:  # the long request is mid-generation: another one joins
                late = asyncio.create_task(c.generate(late_p, max_tokens=N, temperature=0))
        assert seen[-1].token_ids == reference[long_p][:40]
        assert (await late).token_ids == reference[late_p][:N]


def test_stop_strings_and_cancel(server, reference):
    from gdsllm.format.metadata import load_model_meta
    from gdsllm.engine.tokenizer import Tokenizer
    tok = Tokenizer(load_model_meta(server.svc.config.model))
    full = tok.decode(reference[PROMPTS[0]][:N])
    stop = full[len(full) // 2: len(full) // 2 + 2]
    with Client(server.endpoint, timeout=30) as c:
        f = c.generate(PROMPTS[0], max_tokens=N, temperature=0, stop=[stop])
        assert f.finish_reason == "stop" and f.text == full[: full.index(stop)]
        chunks = c.stream_messages(PROMPTS[1], max_tokens=400, temperature=0, request_id="to-cancel")
        next(chunks)
        c.cancel("to-cancel")
        last = list(chunks)[-1]
        assert last.finish_reason == "cancelled" and last.completion_tokens < 400
        reply = raw_exchange(server.endpoint, msgpack.packb({"type": "cancel", "request_id": "nope"}))
        assert (reply["type"], reply["code"], reply["request_id"]) == ("error", "not_found", "nope")
        assert c.generate(PROMPTS[2], max_tokens=N, temperature=0).token_ids == reference[PROMPTS[2]][:N]


async def test_stop_token_ids_end_as_in_llm(server, reference, model_dir):
    """stop_token_ids through the wire (sync and async clients): the generation ends on the first
    such id, included in token_ids and not in the text, exactly as gdsllm.LLM ends it."""
    from gdsllm.engine.llm import LLM
    from gdsllm.engine.sampling import SamplingParams
    ids = reference[PROMPTS[1]][:N]
    stop = ids[4]
    with LLM(str(model_dir)) as llm:
        want = llm.generate(PROMPTS[1], SamplingParams(max_tokens=N, temperature=0,
                                                       stop_token_ids=(stop, 10**6)))
    assert want.finish_reason == "stop" and want.token_ids == ids[: ids.index(stop) + 1]
    with Client(server.endpoint, timeout=30) as c:
        f = c.generate(PROMPTS[1], max_tokens=N, temperature=0, stop_token_ids=(stop, 10**6))
        streamed = "".join(c.stream(PROMPTS[1], max_tokens=N, temperature=0, stop_token_ids=[stop]))
    assert (f.finish_reason, f.token_ids, f.text) == ("stop", want.token_ids, want.text)
    assert streamed == want.text
    async with AsyncClient(server.endpoint, timeout=30) as c:
        f = await c.generate(PROMPTS[1], max_tokens=N, temperature=0, stop_token_ids=[stop])
    assert (f.finish_reason, f.token_ids, f.text) == ("stop", want.token_ids, want.text)


def test_metrics_count_what_the_run_did(server):
    """Tokens and streamed bytes of one generation, as the coordinator reports them."""
    m = server.svc.coordinator.metrics

    def settled():  # idle: every prefetch of the next pass has landed
        deadline = time.time() + 10
        while server.svc.coordinator.batch.sched.loads_in_flight and time.time() < deadline:
            time.sleep(0.02)
        return (m.registry.get_sample_value("gdsllm_generation_tokens_total"),
                m.registry.get_sample_value("gdsllm_storage_read_bytes_total", {"io_mode": "posix"}))

    tokens0, bytes0 = settled()
    with Client(server.endpoint, timeout=30) as c:
        c.generate(PROMPTS[0], max_tokens=N, temperature=0, ignore_eos=True)
    tokens1, bytes1 = settled()
    assert tokens1 - tokens0 == N
    # N passes (the prompt's included), each streaming the 4 blocks; the window's prefetch of
    # the next pass is the same before and after
    assert bytes1 - bytes0 == N * 4 * UNIT


@pytest.mark.gpu
def test_cuda_pipeline_equals_cpu_reference(model_dir, reference):
    """The CUDA backend (KvikIO into the CUDA IPC arena) on a float32 model: greedy tokens equal
    the CPU single-process engine's."""
    with Service(model_dir, device="cuda", vram_budget=2 * UNIT, prefetch_window=2) as s, \
            Client(s.endpoint, timeout=120) as c:
        h = c.health()
        assert h.backend == "cuda" and h.io_path in ("gds", "compat", "posix")
        for p in PROMPTS[:3]:
            assert c.generate(p, max_tokens=N, temperature=0).token_ids == reference[p][:N]


def test_chat_and_seeded_sampling_equal_llm(server, reference):
    with Client(server.endpoint, timeout=30) as c:
        assert c.generate(messages=CHAT, max_tokens=N, temperature=0).token_ids == reference["chat"]
        seeded = [c.generate(PROMPTS[0], max_tokens=N, temperature=0.9, seed=1234).token_ids
                  for _ in range(2)]
    assert seeded[0] == seeded[1] == reference["seeded"]


def test_generate_cli_and_chat_repl(server, reference, capsys):
    import argparse
    import io

    from gdsllm.commands.generate import generate_endpoint as generate_cli
    from gdsllm.commands.run import chat
    from gdsllm.format.metadata import load_model_meta
    from gdsllm.engine.tokenizer import Tokenizer
    tok = Tokenizer(load_model_meta(server.svc.config.model))
    args = argparse.Namespace(prompt=PROMPTS[1], max_tokens=N, temp=0.0, top_p=None, top_k=None,
                              seed=None, chat=False, endpoint=server.endpoint)
    assert generate_cli(args) == 0
    assert capsys.readouterr().out == tok.decode(reference[PROMPTS[1]][:N]) + "\n"
    args.temp = -1.0
    assert generate_cli(args) == 1 and "bad_request" in capsys.readouterr().err
    out = io.StringIO()
    repl = argparse.Namespace(system="be brief", max_tokens=N, temp=0.0, top_p=0.95, top_k=40, seed=None)
    with Client(server.endpoint, timeout=30) as c:
        chat(c, repl, stdin=io.StringIO("hi there\n/reset\nhi there\n/quit\n"), stdout=out)
        answer = c.generate(messages=CHAT, max_tokens=N, temperature=0).text
    # after /reset the same question (same system prompt: CHAT) gets the same answer
    assert out.getvalue() == 2 * (answer + "\n")


async def test_max_batch_queues_the_rest(model_dir, reference):
    """Five requests, two sequences per pass: the rest wait and join as others finish."""
    with Service(model_dir, vram_budget=2 * UNIT, prefetch_window=2, max_batch=2) as s:
        async with AsyncClient(s.endpoint, timeout=60) as c:
            lengths = [N, 3, 7, N, 5]
            finals = await asyncio.gather(*(c.generate(p, max_tokens=n, temperature=0)
                                            for p, n in zip(PROMPTS, lengths)))
            assert (await c.health()).requests_waiting == 0
    for p, n, f in zip(PROMPTS, lengths, finals):
        assert f.token_ids == reference[p][:n], f"prompt {p!r} queued behind a full batch"
