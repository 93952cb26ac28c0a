"""`gdsllm generate` (the local pipeline) stopped by real signals leaves nothing behind: no
/tmp/gdsllm-* directory or socket, no worker process, no /dev/shm arena.

Each case runs the real command in its own session with a private TMPDIR (so the check cannot
see another run's files) and signals it while the service starts or while it generates:
SIGINT to the process alone (not its group, as Ctrl-C would), SIGTERM, and `timeout`.

    python3 -m pytest tests/test_signals.py
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from service_helpers import alive, shm_entries

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def long_model(tmp_path_factory) -> Path:
    """A tiny model with a long context, so a generation outlasts the signal."""
    from gdsllm.convert.synth import synth
    return synth(tmp_path_factory.mktemp("sig") / "tiny", "tiny", layers=2, dtype="float32",
                 overrides={"max_position_embeddings": 8192})


@pytest.fixture
def private_tmp():
    d = tempfile.mkdtemp(prefix="gx", dir="/tmp")  # short: ipc:// paths must fit sockaddr_un
    yield Path(d)
    for root, dirs, files in os.walk(d, topdown=False):
        for f in files:
            os.unlink(os.path.join(root, f))
        for x in dirs:
            os.rmdir(os.path.join(root, x))
    os.rmdir(d)


def descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = [int(c) for c in (task / "children").read_text().split()]
                out.update(kids)
                todo += kids
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def _start(model: Path, tmp: Path, prefix: list[str], stdout=subprocess.PIPE) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "gdsllm", "-v", "generate", "-m", str(model), "-p", "hello", "-n", "8000",
           "--temp", "0", "--device", "cpu"]
    return subprocess.Popen(prefix + cmd, env=env, stdout=stdout, stderr=subprocess.PIPE,
                            start_new_session=True)


def _wait_for_stderr(p: subprocess.Popen, words: str, lines: list[str]) -> None:
    for raw in p.stderr:
        lines.append(raw.decode(errors="replace"))
        if words in lines[-1]:
            return
    raise AssertionError("the command ended before: " + words + "\n" + "".join(lines))


SLOW = pytest.mark.slow  # each case starts the pipeline (~5-15 s on a busy CPU machine)


@pytest.mark.parametrize("sig, phase", [("SIGINT", "generation"),
                                        pytest.param("SIGINT", "start-up", marks=SLOW),
                                        pytest.param("SIGTERM", "generation", marks=SLOW),
                                        pytest.param("SIGTERM", "start-up", marks=SLOW)])
def test_signal_to_the_process_alone_leaves_nothing(long_model, private_tmp, sig, phase):
    p = _start(long_model, private_tmp, [])
    lines: list[str] = []
    try:
        if phase == "start-up":  # the workers are being spawned and are importing torch
            _wait_for_stderr(p, "starting the I/O and compute workers", lines)
            time.sleep(0.5)
        else:
            _wait_for_stderr(p, "serving", lines)
            assert p.stdout.read(1), "no text was generated"
        kids = descendants(p.pid)
        ours = {n for n in shm_entries() if any(n.startswith(f"gdsllm-{k}-") for k in kids)}
        assert list(private_tmp.glob("gdsllm-*")), "the service's socket directory"
        os.kill(p.pid, getattr(signal, sig))  # this process only, not its group
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    err = "".join(lines) + err.decode(errors="replace")
    assert p.returncode == (130 if sig == "SIGINT" else 143), err
    assert "Traceback" not in err, err
    _assert_nothing_left(private_tmp, kids, ours)


def test_timeout_leaves_nothing(long_model, private_tmp):
    """`timeout` signals the whole process group (the workers too) with SIGTERM, in whatever
    phase the command is by then."""
    p = _start(long_model, private_tmp, ["timeout", "-s", "TERM", "10"], stdout=subprocess.DEVNULL)
    kids: set[int] = set()
    try:
        while p.poll() is None:
            kids |= descendants(p.pid)
            time.sleep(0.1)
        err = p.stderr.read().decode(errors="replace")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 124, err  # the generation (8000 tokens) cannot end in 10 s
    assert "Traceback" not in err, err
    _assert_nothing_left(private_tmp, kids, set())


def _assert_nothing_left(tmp: Path, kids: set[int], shm: set[str]) -> None:
    deadline = time.time() + 10  # multiprocessing's resource tracker exits just after its parent
    while [k for k in kids if alive(k)] and time.time() < deadline:
        time.sleep(0.05)
    assert not [k for k in kids if alive(k)], "worker processes outlived gdsllm generate"
    assert not list(tmp.iterdir()), f"left behind: {[str(x) for x in tmp.rglob('*')]}"
    left = {n for n in shm_entries() if any(n.startswith(f"gdsllm-{k}-") for k in kids)}
    assert not (left | (shm & shm_entries())), f"shared memory left behind: {left}"
