"""Faults on the CPU backend, real processes and files: SIGKILLed workers are replaced, a stalled
pass is ended by the watchdog, a unit file corrupted or missing while serving fails only the
requests that needed it (naming the file), a vanished file that comes back is retried, and weight
passes carrying more than 1 MiB of prompt token ids (the issue's reproductions, scaled) complete.
"""
from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import threading
import time

import pytest

from gdsllm.service.client import AsyncClient, Client, ServiceError
from service_helpers import (N, PROMPTS, UNIT, Service, alive, compute_stopped,  # noqa: F401
                             generate_past_io_errors, light_reference, model_dir, shm_entries,
                             single_thread_workers)

pytestmark = pytest.mark.usefixtures("single_thread_workers")

E_H = 131072 + 135168  # embed + head of the tiny shape: resident, the 4 blocks stream through 2 slots


def wait_ok(c: Client, within: float) -> float:
    """Seconds until health says ok (fails after `within`)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        if c.health().status == "ok":
            return time.monotonic() - t0
        time.sleep(0.1)
    pytest.fail(f"health not ok within {within} s: {c.health()}")


def test_sigkill_io_and_compute_workers_three_times_each(model_dir, light_reference):
    seen_pids, seen_shm = set(), set()
    with Service(model_dir, vram_budget=E_H + 2 * UNIT, prefetch_window=2) as s, \
            Client(s.endpoint, timeout=30) as c:
        co = s.svc.coordinator
        for i, name in enumerate(["io", "compute"] * 3):
            seen_pids |= set(co.workers.pids.values())
            arena = co.workers.shm_name  # the compute worker's, whichever worker is killed
            assert arena.startswith(f"gdsllm-{co.workers.pids['compute']}-")
            seen_shm |= {arena}
            stream = c.stream_messages(PROMPTS[i % 3], max_tokens=400, temperature=0, ignore_eos=True)
            next(stream)  # mid-generation
            os.kill(co.workers.pids[name], signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(ServiceError) as err:
                for _ in stream:
                    pass
            ended = time.monotonic() - killed
            assert ended < 5.0, "in-flight request not ended within 5 s"
            assert err.value.code == "worker_died" and f"the {name} worker died" in err.value.message
            print(f"SIGKILL {name} worker: request ended after {ended:.3f} s, health ok after "
                  f"{wait_ok(c, within=30.0) + ended:.1f} s")
            assert arena not in shm_entries(), "the replaced set's arena outlived it"
            f = c.generate(PROMPTS[3], max_tokens=N, temperature=0)
            assert f.token_ids == light_reference[PROMPTS[3]]
        h = c.health()
        assert h.restarts == 6 and h.status == "ok"
        assert not [p for p in seen_pids if alive(p)], "a replaced worker is still running"
        assert not (seen_shm & shm_entries()), "a replaced compute worker's arena was not unlinked"


def test_watchdog_ends_a_pass_that_makes_no_progress(model_dir, light_reference):
    with Service(model_dir, vram_budget=E_H + 2 * UNIT, prefetch_window=2, pass_timeout_s=1.5) as s, \
            Client(s.endpoint, timeout=30) as c:
        stopped = s.svc.coordinator.workers.pids["compute"]
        stream = c.stream_messages(PROMPTS[0], max_tokens=400, temperature=0, ignore_eos=True)
        next(stream)
        os.kill(stopped, signal.SIGSTOP)  # alive, silent: only the watchdog can notice
        t0 = time.monotonic()
        with pytest.raises(ServiceError) as err:
            for _ in stream:
                pass
        assert err.value.code == "timeout" and "no progress" in err.value.message
        assert 1.5 <= time.monotonic() - t0 < 6.0
        wait_ok(c, within=30.0)
        assert not alive(stopped), "the stalled worker was not replaced"
        assert c.generate(PROMPTS[1], max_tokens=N, temperature=0).token_ids == light_reference[PROMPTS[1]]


def test_unit_corrupted_while_serving_is_caught_and_named(model_dir, light_reference, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(model_dir, root)
    f = root / "layer_002.bin"  # block.1, streamed
    good = f.read_bytes()
    with Service(root, vram_budget=E_H + 2 * UNIT, prefetch_window=2, verify="always") as s, \
            Client(s.endpoint, timeout=30) as c:
        assert c.generate(PROMPTS[2], max_tokens=N, temperature=0).token_ids == light_reference[PROMPTS[2]]
        with open(f, "r+b") as fh:  # in place, same size: only the checksum can tell
            fh.seek(1000)
            fh.write(bytes([good[1000] ^ 0x55]))
        with pytest.raises(ServiceError) as err:
            c.generate(PROMPTS[2], max_tokens=N, temperature=0)
        assert err.value.code == "io_error" and "layer_002.bin" in err.value.message
        assert "checksum" in err.value.message
        assert c.health().status == "ok"
        f.write_bytes(good)
        time.sleep(0.3)  # the prefetch of the next pass may have read the corrupt bytes: one pass
        assert generate_past_io_errors(c, PROMPTS[2], 2).token_ids == light_reference[PROMPTS[2]]


def test_two_swapped_blocks_are_caught_with_verify_always(model_dir, light_reference, tmp_path):
    """Issue 24, defect 6: two 4 KiB blocks of a streamed unit swapped in place kept the sum of its
    words, so the service served wrong output; the order-sensitive checksum fails the request."""
    root = tmp_path / "m"
    shutil.copytree(model_dir, root)
    f = root / "layer_002.bin"
    data = bytearray(f.read_bytes())
    a, b = 4096 * 3, 4096 * 7
    assert data[a:a + 4096] != data[b:b + 4096]
    data[a:a + 4096], data[b:b + 4096] = data[b:b + 4096], data[a:a + 4096]
    with Service(root, vram_budget=E_H + 2 * UNIT, prefetch_window=2, verify="always") as s, \
            Client(s.endpoint, timeout=30) as c:
        assert c.generate(PROMPTS[2], max_tokens=N, temperature=0).token_ids == light_reference[PROMPTS[2]]
        with open(f, "r+b") as fh:  # in place, same size, same bytes: only their order changed
            fh.write(data)
        with pytest.raises(ServiceError) as err:
            c.generate(PROMPTS[2], max_tokens=N, temperature=0)
        assert err.value.code == "io_error" and "layer_002.bin" in err.value.message
        assert "checksum" in err.value.message


def test_transient_read_error_is_retried_and_a_lasting_one_named(model_dir, light_reference, tmp_path, capfd):
    root = tmp_path / "m"
    shutil.copytree(model_dir, root)
    f, away = root / "layer_004.bin", root / "away.bin"  # block.3: not among the prefetched first two
    with Service(root, vram_budget=E_H + 2 * UNIT, prefetch_window=2) as s, \
            Client(s.endpoint, timeout=30) as c:
        assert c.generate(PROMPTS[0], max_tokens=2, temperature=0).token_ids == light_reference[PROMPTS[0]][:2]
        time.sleep(0.2)  # the next pass's first two units are prefetched; block.3 is read in the pass
        os.rename(f, away)
        threading.Timer(0.25, os.rename, (away, f)).start()  # back before the retries run out
        assert c.generate(PROMPTS[1], max_tokens=N, temperature=0).token_ids == light_reference[PROMPTS[1]]
        assert "retrying" in capfd.readouterr().err
        time.sleep(0.2)
        os.rename(f, away)  # gone for good
        with pytest.raises(ServiceError) as err:
            c.generate(PROMPTS[1], max_tokens=N, temperature=0)
        assert err.value.code == "io_error" and "layer_004.bin" in err.value.message
        os.rename(away, f)
        assert c.health().status == "ok"


# ---------------------------------------------------------------- > 1 MiB passes (the issue)


@pytest.fixture(scope="module")
def narrow_dir(tmp_path_factory):
    """A very narrow model (hidden 16) with a 70,000-id vocabulary (ids above 65535 exist) and a
    1024-token context: a pass of 350K tokens costs little on a CPU."""
    from gdsllm.convert.synth import synth
    root = tmp_path_factory.mktemp("narrow")
    return synth(root / "m", shape="tiny", layers=1, dtype="float32", seed=5,
                 overrides={"vocab_size": 70_000, "hidden_size": 16, "num_attention_heads": 2,
                            "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 32,
                            "max_position_embeddings": 1024})


async def _one_pass(s, ac: AsyncClient, n: int, submit):
    """With the compute worker stopped, `submit()` n requests (the first starts a pass that stalls,
    the rest queue); once all n - 1 wait it resumes: the next pass takes every one of them at once."""
    with compute_stopped(s):
        submitted = submit()
        deadline = time.monotonic() + 120
        while (await ac.health()).requests_waiting < n - 1:
            assert time.monotonic() < deadline, "requests did not queue"
            await asyncio.sleep(0.05)
    return submitted


def test_many_prompts_over_1mib_of_token_ids_in_one_pass(narrow_dir):
    """'48 prompts of about 8K tokens with --max-batch 48', scaled: 1100 prompts of ~330 tokens
    (ids 128..65535: 3 bytes each in msgpack) through the public socket, one pass > 1 MiB."""
    rng = random.Random(1)
    prompts = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(660)) for _ in range(1100)]

    async def scenario(s):
        async with AsyncClient(s.endpoint, timeout=300) as ac:
            tasks = await _one_pass(s, ac, len(prompts), lambda: [
                asyncio.ensure_future(ac.generate(p, max_tokens=2, temperature=0)) for p in prompts])
            return await asyncio.gather(*tasks)

    with Service(narrow_dir, max_batch=2048, max_pass_tokens=0, max_inflight_per_client=4096) as s:
        finals = asyncio.run(scenario(s))
        assert all(f.finish_reason == "length" and f.completion_tokens == 2 for f in finals)
        assert sum(f.prompt_tokens for f in finals) > 350_000
        print(f"largest pass start: {s.svc.coordinator.batch.largest_pass_bytes} bytes, "
              f"{sum(f.prompt_tokens for f in finals)} prompt tokens")
        assert s.svc.coordinator.batch.largest_pass_bytes > 1 << 20
        with Client(s.endpoint, timeout=30) as c:
            assert c.health().status == "ok"


def test_prompts_with_ids_above_65535_over_1mib_in_one_pass(narrow_dir):
    """'two 120K-token prompts with ids above 65535', scaled: 512 prompts of 420 ids in
    [65536, 70000) (5 bytes each in msgpack). The synth tokenizer makes no such ids from text
    (they are pairs of bytes that never occur in UTF-8, or fillers), so the sequences are handed
    to the running coordinator's scheduler directly, past the tokenizer; everything after that
    (the pass, the workers, the replies on the public socket) is the real path."""
    import zmq

    from ipc.messages import Final, Generate, decode, encode
    from ipc.messages import Health
    from gdsllm.service.requests import Sequence
    rng = random.Random(2)
    prompts = [[rng.randrange(65536, 70000) for _ in range(420)] for _ in range(512)]
    with Service(narrow_dir, max_batch=1024, max_pass_tokens=0, max_inflight_per_client=4096) as s:
        co = s.svc.coordinator
        ctx = zmq.Context()
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.setsockopt(zmq.ROUTING_ID, b"repro")  # the identity the injected requests answer to
        d.connect(s.endpoint)
        d.send(encode(Health("h")))
        assert d.poll(30_000)
        d.recv()

        def inject():
            for i, ids in enumerate(prompts):
                msg = Generate(request_id=f"r{i}", prompt="(ids)", max_tokens=2, temperature=0.0)
                co.batch.add(Sequence(co.next_seq, b"repro", msg, ids, co.tokenizer, co.eos_ids, co.max_context))
                co.next_seq += 1

        async def scenario():
            async with AsyncClient(s.endpoint, timeout=60) as ac:
                await _one_pass(s, ac, len(prompts), lambda: s.svc._loop.call_soon_threadsafe(inject))
        asyncio.run(scenario())
        finals = {}
        deadline = time.monotonic() + 300
        while len(finals) < len(prompts) and time.monotonic() < deadline:
            if d.poll(1000):
                m = decode(d.recv())
                assert not hasattr(m, "code"), m  # no Error
                if isinstance(m, Final):
                    finals[m.request_id] = m
        d.close()
        ctx.term()
        assert len(finals) == len(prompts) and all(f.completion_tokens == 2 for f in finals.values())
        assert co.batch.largest_pass_bytes > 1 << 20
        print(f"largest pass start: {co.batch.largest_pass_bytes} bytes (ids above 65535)")
