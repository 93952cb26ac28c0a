"""gdsllm.engine.prefetch: the in-process prefetch window `LLM` streams through.

A recording loader stands in for storage where the order of reads is the point (which unit lands in
which slot, how far the reader runs ahead, what a failed read does); the real loader and a real
model where the tokens are.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from gdsllm import LLM, SamplingParams
from gdsllm.engine.prefetch import Prefetch
from gdsllm.format.metadata import TensorMeta, UnitMeta
from llama_ref import load, synth_model

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
SLOT = 4096


def unit(i: int) -> UnitMeta:
    t = TensorMeta("w", "float32", (SLOT // 4,), 0, SLOT)
    return UnitMeta(i, f"u{i}", "block", i, f"layer_{i:03d}.bin", SLOT, "-", (t,))


class Recorder:
    """Fills the slot with the unit's index; logs (unit, slot start); can fail once on a unit."""

    def __init__(self, fail_on: int | None = None):
        self.log: list[tuple[int, int]] = []
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def load(self, u: UnitMeta, buf: torch.Tensor) -> float:
        if u.index == self.fail_on:
            self.fail_on = None
            raise OSError(f"{u.file}: read failed")
        buf.view(torch.float32).fill_(float(u.index))
        with self.lock:
            self.log.append((u.index, buf.data_ptr()))
        return 0.0


def settle(pf: Prefetch, reads: int, timeout: float = 10.0) -> None:
    """Wait until the reader has done `reads` reads and then check it does no more."""
    deadline = time.monotonic() + timeout
    while pf.reads < reads and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)
    assert pf.reads == reads


def run_pass(pf: Prefetch, units: list[UnitMeta]) -> list[float]:
    seen = []
    for u in units:
        buf = pf.take(u)
        seen.append(float(buf.view(torch.float32)[0]))
        pf.release()
    return seen


@pytest.mark.parametrize("window", [1, 2, 3])
def test_reads_run_ahead_by_the_window_and_across_passes(window):
    units = [unit(i) for i in range(5)]
    arena = torch.zeros(window * SLOT, dtype=torch.uint8)
    slots = [arena[s * SLOT:(s + 1) * SLOT] for s in range(window)]
    rec = Recorder()
    pf = Prefetch(units, slots, rec, torch.device("cpu"))
    try:
        settle(pf, window)  # before anything runs: exactly the window is read ahead
        assert [u for u, _ in rec.log] == list(range(window))
        for p in range(3):
            assert run_pass(pf, units) == [float(i) for i in range(5)]
        settle(pf, 15 + window)  # 3 passes, and the next pass's first units already read
        assert [u for u, _ in rec.log] == [s % 5 for s in range(15 + window)]
        # sequence number s always lands in slot s % window
        assert [ptr for _, ptr in rec.log] == [slots[s % window].data_ptr() for s in range(15 + window)]
    finally:
        pf.close()


def test_a_failed_read_is_raised_where_it_is_needed_and_the_next_pass_starts_over():
    units = [unit(i) for i in range(4)]
    arena = torch.zeros(2 * SLOT, dtype=torch.uint8)
    pf = Prefetch(units, [arena[:SLOT], arena[SLOT:]], Recorder(fail_on=2), torch.device("cpu"))
    try:
        assert run_pass(pf, units[:2]) == [0.0, 1.0]
        with pytest.raises(OSError, match="layer_002.bin: read failed"):
            pf.take(units[2])
        assert run_pass(pf, units) == [0.0, 1.0, 2.0, 3.0]  # read again, in order
    finally:
        pf.close()


def test_realign_after_a_pass_stopped_midway():
    units = [unit(i) for i in range(3)]
    arena = torch.zeros(2 * SLOT, dtype=torch.uint8)
    pf = Prefetch(units, [arena[:SLOT], arena[SLOT:]], Recorder(), torch.device("cpu"))
    try:
        pf.take(units[0])
        pf.realign()  # the pass failed after its first unit: no release, the window starts over
        assert run_pass(pf, units) == [0.0, 1.0, 2.0]
        with pytest.raises(RuntimeError, match="asked for unit u2, the window holds u0 next"):
            pf.take(units[2])
        pf.take(units[0])
        with pytest.raises(RuntimeError, match="before the previous unit's release"):
            pf.take(units[1])
    finally:
        pf.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synth_model(tmp_path_factory.mktemp("pf"), seed=5, num_hidden_layers=6)[1]


def test_llm_tokens_equal_resident_for_every_window(tiny):
    meta = load(tiny)
    with LLM(str(tiny)) as m:
        want = m.generate(["window", "two prompts"], GREEDY)
    block = max(u.nbytes for u in meta.units[1:-1])
    for window in (1, 2, 4):
        budget = meta.units[0].nbytes + meta.units[-1].nbytes + window * block + 8192
        with LLM(str(tiny), vram_budget=budget, prefetch_window=window) as m:
            assert m.plan.num_slots == window and m.plan.streamed
            assert m.prefetch.window == window
            got = m.generate(["window", "two prompts"], GREEDY)
            assert [o.token_ids for o in got] == [o.token_ids for o in want]
    with pytest.raises(ValueError, match="prefetch_window must be 1 to 64"):
        LLM(str(tiny), prefetch_window=0)


@pytest.mark.gpu
def test_llm_on_cuda_streams_through_the_window_with_the_resident_tokens(tiny):
    """On CUDA a slot is refilled only after its previous unit's kernels ran (an event per slot):
    streamed tokens equal the resident model's for every window, graphs on."""
    meta = load(tiny)
    with LLM(str(tiny), device="cuda") as m:
        want = [o.token_ids for o in m.generate(["window", "two prompts", "x"], GREEDY)]
    block = max(u.nbytes for u in meta.units[1:-1])
    for window in (1, 2, 3):
        budget = meta.units[0].nbytes + meta.units[-1].nbytes + window * block + 8192
        with LLM(str(tiny), device="cuda", vram_budget=budget, prefetch_window=window) as m:
            assert m.plan.streamed and m.prefetch.window == window
            for _ in range(2):
                assert [o.token_ids for o in m.generate(["window", "two prompts", "x"], GREEDY)] == want


@pytest.mark.gpu
def test_a_script_that_leaves_a_streaming_llm_open_exits_cleanly(tiny, tmp_path):
    """The reader thread may be inside a read (KvikIO, C++) when the interpreter ends: an atexit
    hook stops it first (without it the H200 run ended in std::terminate)."""
    import subprocess
    import sys
    meta = load(tiny)
    block = max(u.nbytes for u in meta.units[1:-1])
    budget = meta.units[0].nbytes + meta.units[-1].nbytes + block + 8192
    script = tmp_path / "leave_open.py"
    script.write_text(
        "from gdsllm import LLM, SamplingParams\n"
        f"llm = LLM({str(tiny)!r}, device='cuda', vram_budget={budget}, prefetch_window=1)\n"
        "print(len(llm.generate('x', SamplingParams(max_tokens=3, temperature=0)).token_ids))\n")
    for _ in range(3):
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and r.stdout.strip() == "3", r.stderr[-2000:]
        assert "terminate" not in r.stderr
