"""The compute worker process over loaded arena slots: the same tokens as the Runner in-process.

The test plays the coordinator with both real workers (spawn processes, PAIR sockets): the compute
worker's arena opened by the I/O worker, embed and head resident, the blocks streamed through two
rotating slots, Run after each Loaded.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gdsllm.service.compute_worker import run_compute_process
from gdsllm.config import ServiceConfig
from gdsllm.format.metadata import load_model_meta
from gdsllm.service.io_worker import run_io_process
from ipc.messages import (ComputeReady, Done, IoReady, Load, MakeRunner, PassResult, Run, RunnerReady,
                          SeqSampling, StartPass, WorkerError)
from workerkit import Peer, arena_of, edir, model, write_model  # noqa: F401  (fixtures)


def reference_tokens(meta, prompts: dict[int, list[int]], sampling: dict[int, SeqSampling],
                     steps: int) -> dict[int, list[int]]:
    """The same generation in this process: Runner over the unit files, one Sampler per sequence."""
    from gdsllm.models.views import unit_tensors
    from gdsllm.engine.runner import Runner
    from gdsllm.engine.sampling import Sampler, SamplingParams
    from gdsllm.format.storage import HostReader, aligned_host_buffer

    bufs = []
    with HostReader() as r:
        for u in meta.units:
            bufs.append(aligned_host_buffer(u.nbytes))
            r.read(meta.path(u), bufs[-1], u.nbytes)
    runner = Runner(meta.params, "cpu", torch.float32)
    samplers = {sid: Sampler(SamplingParams(temperature=s.temperature, top_p=s.top_p,
                                            top_k=s.top_k, seed=s.seed)) for sid, s in sampling.items()}
    out = {sid: [] for sid in prompts}
    chunks = list(prompts.items())
    for _ in range(steps):
        runner.start_pass(chunks)
        for u, b in zip(meta.units, bufs):
            runner.run_unit(u, unit_tensors(u, b))
        logits = runner.end_pass()
        picks = Sampler.sample_batch(logits, [samplers[sid] for sid, _ in chunks])
        chunks = []
        for (sid, _), t in zip(list(out.items()), picks):
            out[sid].append(t)
            chunks.append((sid, [t]))
    return out


class Pipeline:
    """The test as coordinator: embed and head resident, blocks streamed through 2 slots."""

    def __init__(self, model: Path, edir, device: str = "cpu", resident=(0, -1)):
        self.meta = meta = load_model_meta(model)
        self.resident, base = {}, 0
        for u in sorted(r % len(meta.units) for r in resident):
            self.resident[u] = base
            base += meta.units[u].nbytes
        slot = max(u.nbytes for u in meta.units)
        self.slots = [base, base + slot]
        cfg = ServiceConfig(model=model, device=device, prefetch_window=2)
        self.compute = Peer(run_compute_process, (cfg, base + 2 * slot), edir, "compute")
        assert isinstance(self.compute.hello, ComputeReady), self.compute.hello
        assert self.compute.hello.device.split(":")[0] == device
        assert self.compute.hello.arena_bytes == base + 2 * slot
        self.io = Peer(run_io_process, (cfg,), edir, "io", arena=arena_of(self.compute.hello))
        assert isinstance(self.io.hello, IoReady), self.io.hello
        self.compute.send(MakeRunner())  # resident units run from the arena unpinned
        ready = self.compute.recv()  # free_bytes: the device's free memory on CUDA, None on the CPU
        assert isinstance(ready, RunnerReady) and ready.kv_tokens > 0, ready
        for unit, off in self.resident.items():
            self.io.send(Load(unit, -1, off))
        assert all(self.io.recv().error is None for _ in self.resident)
        self.pass_id = 0
        self.released: list[int] = []  # sequences the next StartPass releases

    def run_pass(self, chunks, sampling, units=None) -> list:
        """One weight pass; returns every compute reply after StartPass, in order."""
        self.pass_id += 1
        self.compute.send(StartPass(self.pass_id, chunks, sampling, released=self.released))
        self.released = []
        replies = []
        for i, u in enumerate(units if units is not None else range(len(self.meta.units))):
            if u in self.resident:
                slot, off = -1, self.resident[u]
            else:
                slot = i % 2
                off = self.slots[slot]
                self.io.send(Load(u, slot, off))
                assert self.io.recv().error is None
            self.compute.send(Run(u, slot, off))
            while True:  # until this unit's Done: the slot is free again only then
                m = self.compute.recv()
                replies.append(m)
                if isinstance(m, Done):
                    assert (m.unit, m.slot) == (u, slot)
                    break
        if units is None and not any(isinstance(m, WorkerError) for m in replies):
            replies.append(self.compute.recv())
        return replies

    def generate(self, prompts, sampling, steps) -> dict[int, list[int]]:
        out = {sid: [] for sid in prompts}
        chunks, new = list(prompts.items()), dict(sampling)
        for _ in range(steps):
            replies = self.run_pass(chunks, new)
            new = {}
            result = replies[-1]
            assert isinstance(result, PassResult) and result.pass_id == self.pass_id, replies
            assert all(isinstance(m, Done) for m in replies[:-1])
            assert result.seconds >= 0 and list(result.tokens) == [s for s, _ in chunks]
            for sid, (t,) in result.tokens.items():
                out[sid].append(t)
            chunks = [(sid, ts) for sid, ts in result.tokens.items()]
        return out

    def close(self) -> None:
        assert self.io.close() == 0  # first: it maps the compute worker's arena
        assert self.compute.close() == 0


@pytest.fixture
def pipeline(model, edir):
    p = Pipeline(model, edir)
    yield p
    p.close()


def test_compute_worker_matches_runner_in_process(pipeline):
    prompts = {1: [3, 14, 15, 92, 65], 2: [7], 5: [2, 71, 82, 81, 82, 84, 59, 0]}
    sampling = {1: SeqSampling(0.0, 1.0, 0, None), 2: SeqSampling(0.9, 0.95, 20, 1234),
                5: SeqSampling(1.3, 1.0, 0, 99)}
    got = pipeline.generate(prompts, sampling, steps=6)
    assert got == reference_tokens(pipeline.meta, prompts, sampling, steps=6)
    pipeline.released = [1, 2, 5]
    # released sequences start over: the same ids and prompts give the same tokens again
    assert pipeline.generate(prompts, sampling, steps=6) == got


def test_compute_worker_reports_a_failing_step_and_keeps_serving(pipeline):
    meta, greedy = pipeline.meta, {1: SeqSampling(0.0, 1.0, 0, None)}
    pipeline.compute.send(Run(0, -1, 0))  # no pass yet
    assert "outside a pass" in pipeline.compute.recv().message
    assert pipeline.compute.recv() == Done(0, -1, 0.0)
    # block.1 before block.0: the Runner refuses; the error names the pass and the unit
    replies = pipeline.run_pass([(1, [5, 6])], greedy, units=[0, 2, 1, 3])
    assert isinstance(replies[0], Done) and replies[0].unit == 0 and replies[0].seconds > 0
    err = replies[1]
    assert isinstance(err, WorkerError) and not err.fatal
    assert (err.pass_id, err.unit) == (pipeline.pass_id, 2)
    assert f"pass {pipeline.pass_id}" in err.message and "block.1" in err.message
    # the failed pass's units are all acknowledged (slots free), nothing else is computed
    assert [(m.unit, m.seconds) for m in replies[2:]] == [(2, 0.0), (1, 0.0), (3, 0.0)]
    # bad sampling values and unknown sequences fail the StartPass, not the worker
    replies = pipeline.run_pass([(2, [1])], {2: SeqSampling(0.5, 2.0, 0, None)}, units=[0])
    assert isinstance(replies[0], WorkerError) and "top_p" in replies[0].message
    replies = pipeline.run_pass([(3, [1])], {}, units=[0])
    assert "sequences [3] have no sampling parameters" in replies[0].message
    replies = pipeline.run_pass([(4, [meta.params.vocab_size])], {4: greedy[1]}, units=[0])
    assert "outside the vocabulary" in replies[0].message
    pipeline.compute.sock.send(b"\xc1")
    assert "bad message" in pipeline.compute.recv().message
    # and the next good pass is served correctly
    pipeline.released = [1, 2, 3, 4]
    prompts = {1: [5, 6]}
    assert pipeline.generate(prompts, greedy, 3) == reference_tokens(meta, prompts, greedy, 3)


def test_compute_worker_sampling_failure_after_the_head(tmp_path, edir):
    """The head ran (its Done is out), then a sequence's logits (NaN) cannot be sampled: the
    pass's result names it (only its request fails), no second Done, and the worker serves on."""
    p = Pipeline(write_model(tmp_path / "nan", nan_head=True), edir)
    try:
        replies = p.run_pass([(1, [4, 5])], {1: SeqSampling(1.0, 1.0, 0, 7)}, units=[0, 1, 2, 3, 4])
        assert [type(m) for m in replies] == [Done] * 5
        res = p.compute.recv()
        assert isinstance(res, PassResult) and res.pass_id == p.pass_id and res.tokens == {}
        assert list(res.failed) == [1] and "not finite" in res.failed[1]
        # a pass scheduled ahead of it has no token for that sequence: it is left out (here the
        # only one, so that pass fails to start)
        p.pass_id += 1
        p.compute.send(StartPass(p.pass_id, [(1, [])], {}, follows=p.pass_id - 1))
        err = p.compute.recv()
        assert isinstance(err, WorkerError) and err.pass_id == p.pass_id
        assert f"no sequence of pass {p.pass_id - 1} sampled a token" in err.message
        p.released = [1]
        replies = p.run_pass([(2, [4])], {2: SeqSampling(0.0, 1.0, 0, None)}, units=[0, 1, 2, 3, 4])
        assert [type(m) for m in replies] == [Done] * 5
        res = p.compute.recv()  # greedy: an argmax, whatever the logits
        assert isinstance(res, PassResult) and list(res.tokens) == [2] and not res.failed
    finally:
        p.close()


def test_compute_worker_without_a_runner(model, edir):
    c = Peer(run_compute_process, (ServiceConfig(model=model), 1 << 20), edir, "compute")
    try:
        c.send(StartPass(1, [(1, [2])], {1: SeqSampling(0.0, 1.0, 0, None)}))
        c.send(Run(0, 0, 0))
        err = c.recv()  # the pass fails to start: its Run then comes back Done, nothing computed
        assert isinstance(err, WorkerError) and "no runner is made" in err.message and err.pass_id == 1
        assert c.recv() == Done(0, 0, 0.0)
        c.send(MakeRunner({99: 0}))
        err = c.recv()
        assert isinstance(err, WorkerError) and err.fatal
        assert "cannot pin the resident units: unit 99 out of range" in err.message
        c.proc.join(30)
        assert c.proc.exitcode == 0
    finally:
        c.close()


def test_compute_worker_tied_head_reads_the_resident_embedding(tmp_path, edir):
    """A tied model stored once: the head multiplies by the resident embed unit's table (the
    reference runs every unit from its own buffer); an embedding in a streaming slot, which
    could be refilled before the head runs, is refused."""
    model = write_model(tmp_path / "tied", tied=True)
    p = Pipeline(model, edir)
    try:
        assert [t.name for t in p.meta.units[-1].tensors] == ["norm.weight"]
        prompts, greedy = {1: [3, 14, 15], 2: [7]}, {1: SeqSampling(0.0, 1.0, 0, None),
                                                     2: SeqSampling(0.8, 0.9, 0, 5)}
        assert p.generate(prompts, greedy, 4) == reference_tokens(p.meta, prompts, greedy, 4)
    finally:
        p.close()
    p = Pipeline(model, edir, resident=(-1,))
    try:
        replies = p.run_pass([(1, [2])], {1: SeqSampling(0.0, 1.0, 0, None)}, units=[0])
        assert isinstance(replies[0], WorkerError) and "must be resident" in replies[0].message
        assert isinstance(replies[1], Done) and replies[1].unit == 0
    finally:
        p.close()


@pytest.mark.gpu
def test_cuda_pipeline_matches_the_cpu_reference(model, edir):
    """KvikIO into the compute worker's arena, opened over CUDA IPC, compute on the GPU: the CPU
    reference's greedy tokens."""
    pytest.importorskip("cupy", reason="the CUDA arena needs CuPy: pip install 'gdsllm[cuda]'")
    p = Pipeline(model, edir, device="cuda")
    try:
        assert p.compute.hello.backend == "cuda" and len(p.compute.hello.handle) == 64
        assert p.io.hello.io_path in ("gds", "compat", "posix")
        prompts = {1: [3, 14, 15, 92, 65], 2: [7, 8]}
        greedy = {1: SeqSampling(0.0, 1.0, 0, None), 2: SeqSampling(0.0, 1.0, 0, None)}
        assert p.generate(prompts, greedy, 5) == reference_tokens(p.meta, prompts, greedy, 5)
    finally:
        p.close()


def test_compute_worker_runs_a_pass_scheduled_ahead(model, edir):
    """Everything resident, each StartPass carrying its Runs: the pass after it (`follows`) is
    sent before its result is read, and begins with the tokens the worker sampled itself; the
    same tokens as passes sent one at a time. A pass ahead of a failed pass fails too (its Runs
    come back Done, nothing computed), and the worker serves on."""
    meta = load_model_meta(model)
    p = Pipeline(model, edir, resident=range(len(meta.units)))
    try:
        runs = [(u, -1, p.resident[u], 1) for u in range(len(meta.units))]
        prompts = {1: [3, 14, 15, 92, 65], 2: [7]}
        sampling = {1: SeqSampling(0.0, 1.0, 0, None), 2: SeqSampling(0.9, 0.95, 20, 1234)}
        want = reference_tokens(meta, prompts, sampling, steps=4)

        def results(n):
            out = []
            for m in iter(p.compute.recv, None):
                assert isinstance(m, (Done, PassResult)), m
                if isinstance(m, PassResult):
                    out.append(m)
                    if len(out) == n:
                        return out

        p.compute.send(StartPass(1, list(prompts.items()), sampling, runs=runs))
        p.compute.send(StartPass(2, [(1, []), (2, [])], {}, runs=runs, follows=1))
        got = results(2)
        assert [r.pass_id for r in got] == [1, 2]
        p.compute.send(StartPass(3, [(1, []), (2, [])], {}, runs=runs, follows=2))
        p.compute.send(StartPass(4, [(1, []), (2, [])], {}, runs=runs, follows=3))
        got += results(2)
        assert {sid: [r.tokens[sid][0] for r in got] for sid in prompts} == want
        # pass 5 fails to start (a token outside the vocabulary): pass 6, ahead of it, fails too
        p.compute.send(StartPass(5, [(1, [meta.params.vocab_size])], {}, runs=runs))
        p.compute.send(StartPass(6, [(1, [])], {}, runs=runs, follows=5))
        replies = [p.compute.recv() for _ in range(2 * (1 + len(runs)))]
        errors = [m for m in replies if isinstance(m, WorkerError)]
        assert [e.pass_id for e in errors] == [5, 6] and "gave no tokens here" in errors[1].message
        assert [m.seconds for m in replies if isinstance(m, Done)] == [0.0] * 2 * len(runs)
        # a pass ahead that skips one is refused the same way; then a normal pass is served
        p.compute.send(StartPass(8, [(2, [])], {}, runs=runs, follows=7))
        assert p.compute.recv().pass_id == 8
        assert [p.compute.recv() for _ in runs] == [Done(u, -1, 0.0) for u in range(len(runs))]
        p.compute.send(StartPass(9, [(3, [5, 6])], {3: SeqSampling(0.0, 1.0, 0, None)}, runs=runs))
        assert isinstance(results(1)[0], PassResult)
    finally:
        p.close()
