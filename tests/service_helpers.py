"""Shared by the service tests: a tiny synth model, its single-process reference tokens, a
LocalService wrapper that checks the service left no worker process or /dev/shm arena behind, one
such server per module (`server`), a raw DEALER exchange of one msgpack message, and the compute
worker held still (`compute_stopped`) so that requests queue behind a pass that cannot end."""
from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from gdsllm.config import ServiceConfig
from gdsllm.service.pipeline import LocalService

PROMPTS = ["hello world", "the quick brown fox", "a b c d e f", "once upon a time there was",
           "zzz", "1 2 3 4 5 6 7 8 9", "GdsLLM streams weights", "x y"]
N = 12  # new tokens per request
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
UNIT = 192512  # bytes of one float32 decoder block of the tiny shape (the largest unit)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from gdsllm.convert.synth import synth
    root = tmp_path_factory.mktemp("svc")
    return synth(root / "tiny", shape="tiny", layers=4, dtype="float32", seed=7, hf_out=root / "hf")


@pytest.fixture(scope="module")
def reference(model_dir) -> dict[str, list[int]]:
    """Greedy ids of each prompt, generated alone by the single-process engine."""
    from gdsllm.engine.llm import LLM
    from gdsllm.engine.sampling import SamplingParams
    with LLM(str(model_dir)) as llm:
        ref = {p: llm.generate(p, SamplingParams(max_tokens=40, temperature=0)).token_ids
               for p in PROMPTS}
        ref["chat"] = llm.generate(CHAT, SamplingParams(max_tokens=N, temperature=0)).token_ids
        ref["seeded"] = llm.generate(PROMPTS[0], SamplingParams(max_tokens=N, temperature=0.9,
                                                                 seed=1234)).token_ids
        return ref


def shm_entries() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("gdsllm-")}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


class Service:
    """A LocalService that also checks it left no processes or shared memory behind."""

    def __init__(self, model_dir, **cfg):
        self.svc = LocalService(ServiceConfig(model=model_dir, metrics_port=None, **cfg))

    def __enter__(self):
        self.svc.start()
        self.pids = list(self.svc.coordinator.workers.pids.values())
        name = self.svc.coordinator.workers.shm_name
        self.shm = {name} if name else set()  # the CUDA arena is device memory, not /dev/shm
        if self.svc.config.device == "cpu":
            assert self.shm and self.shm <= shm_entries(), "the CPU arena is a /dev/shm segment"
            owner = self.svc.coordinator.workers.pids["compute"]
            assert name.startswith(f"gdsllm-{owner}-"), "the compute worker owns the arena"
        self.endpoint = self.svc.endpoint
        return self

    def __exit__(self, *exc):
        self.svc.stop()
        deadline = time.time() + 5
        while any(alive(p) for p in self.pids) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(alive(p) for p in self.pids), "worker processes outlived the service"
        assert not (self.shm & shm_entries()), "the shared-memory arena outlived the service"


@pytest.fixture(scope="module", autouse=False)
def single_thread_workers():
    """Worker processes spawned meanwhile use one torch thread: tiny models gain nothing from more,
    and on a shared CI machine spinning OpenMP threads make each small op take milliseconds."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def light_reference(model_dir) -> dict[str, list[int]]:
    """Greedy ids (N tokens) of PROMPTS[:6] from the single-process engine: `reference`, cheaper."""
    from gdsllm.engine.llm import LLM
    from gdsllm.engine.sampling import SamplingParams
    with LLM(str(model_dir)) as llm:
        return {p: llm.generate(p, SamplingParams(max_tokens=N, temperature=0)).token_ids
                for p in PROMPTS[:6]}


@pytest.fixture(scope="module")
def server(model_dir):
    """One server for most tests: embed and head resident, blocks streamed through 2 slots."""
    with Service(model_dir, vram_budget=131072 + 135168 + 2 * UNIT, prefetch_window=2) as s:
        yield s


@contextlib.contextmanager
def compute_stopped(s: Service):
    """The compute worker SIGSTOPped for the block: its pass stalls, so nothing finishes and what is
    submitted meanwhile queues, whatever the machine's speed. The supervisor, which replaces a
    worker stopped for STOPPED_S (2 s), is told to leave this one, held on purpose."""
    from gdsllm.service import supervisor
    pid = s.svc.coordinator.workers.pids["compute"]
    held = pytest.MonkeyPatch()
    held.setattr(supervisor, "STOPPED_S", float("inf"))
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
        held.undo()


def raw_exchange(endpoint, payload: bytes, timeout=10.0):
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    try:
        s.send(payload)
        assert s.poll(int(timeout * 1000)), "no reply to a malformed message"
        return msgpack.unpackb(s.recv())
    finally:
        s.close()
        ctx.term()


def generate_past_io_errors(c, prompt: str, tries: int):
    """`c.generate(prompt, N greedy tokens)`, tried up to `tries` times while it fails with
    io_error (a unit file just restored: a pass already prefetching may have read it bad)."""
    from gdsllm.service.client import ServiceError
    for k in range(tries):
        try:
            return c.generate(prompt, max_tokens=N, temperature=0)
        except ServiceError as e:
            assert e.code == "io_error" and k < tries - 1, e
