"""What a new user meets at the `gdsllm` command: help on every option, the device chosen for them,
one-line errors (never a traceback), the context limit said out loud, the `run` REPL's commands,
and what the service shows while it starts and while a long prefill runs.

    python3 -m pytest tests/test_cli.py
"""
from __future__ import annotations

import argparse
import functools
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gdsllm import cli
from conftest import concurrently
from gdsllm.service.client import Client
from service_helpers import UNIT, Service, model_dir  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]


def _gdsllm(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "gdsllm", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(r, command: str, words: str) -> None:
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith(f"gdsllm {command}: error: ")]
    assert len(errors) == 1 and words in errors[0], r.stderr


# --- the parser ----------------------------------------------------------------------------------

def test_every_option_of_every_command_has_help():
    parser = cli.build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) == set(cli.COMMANDS)
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in sub.choices.items()
               for a in p._actions if not a.help]
    assert missing == []


def test_a_command_that_fails_to_import_is_an_error_not_a_missing_command(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + ("no_such_command",))
    with pytest.raises(ModuleNotFoundError, match="no_such_command"):
        cli.build_parser()


# --- the device ----------------------------------------------------------------------------------

@pytest.mark.parametrize("gpu, cupy, want", [(False, False, "cpu"), (True, False, "cpu"),
                                             (True, True, "cuda")])
def test_default_device_is_cuda_only_where_usable(monkeypatch, gpu, cupy, want):
    import importlib.util

    from gdsllm.commands.serve import pick_device
    real = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if cupy else None) if name == "cupy" else real(name, *a))
    assert pick_device(None) == want
    assert pick_device(None, service=False) == ("cuda" if gpu else "cpu")  # LLM needs no CuPy
    assert pick_device("cpu") == "cpu"
    if want == "cpu":
        with pytest.raises(ValueError, match="CuPy" if gpu else "--device cuda"):
            pick_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
def test_bench_and_serve_say_why_cuda_cannot_be_used(model_dir):
    commands = ("bench", "serve")
    runs = concurrently(*(functools.partial(_gdsllm, c, "-m", model_dir, "--device", "cuda")
                          for c in commands))
    for command, r in zip(commands, runs):
        _one_line_error(r, command, "--device cuda: torch")


def test_user_errors_are_one_line(model_dir, tmp_path):
    info, run, budget, n = concurrently(  # `run` waits 10 s for a reply meanwhile
        lambda: _gdsllm("info", "-m", tmp_path / "nope"),
        lambda: _gdsllm("run", "--endpoint", "tcp://127.0.0.1:9"),
        lambda: _gdsllm("generate", "-m", model_dir, "-p", "hi", "--vram-budget", "1KB"),
        lambda: _gdsllm("generate", "-m", model_dir, "-p", "hi", "-n", "1000000"))
    _one_line_error(info, "info", "nope")
    _one_line_error(run, "run", "is `gdsllm serve` running")
    _one_line_error(budget, "generate", "--vram-budget 1000 bytes is too small")
    _one_line_error(n, "generate", "-n 1000000: the model's context holds 512 tokens")
    from gdsllm.service.worker_set import WorkerStartError
    assert "'cupy' is not installed" in cli.user_error(ModuleNotFoundError("no cupy", name="cupy"))
    assert cli.user_error(WorkerStartError("io worker: x")) == "io worker: x"
    assert cli.user_error(KeyError("a bug")) is None  # a bug keeps its traceback


def test_checks_that_need_no_workers_come_before_them(model_dir, tmp_path):
    """A prompt longer than the context (here 300 KB, from a file), or a chat request to a model
    without a chat template: one line, and no worker was started (-v logs their start)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    import json
    import shutil
    big = tmp_path / "big.txt"
    big.write_text("hello " * 50_000, encoding="utf-8")
    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain)
    meta = json.loads((plain / "metadata.json").read_text())
    meta["chat_template"] = None
    (plain / "metadata.json").write_text(json.dumps(meta))
    from_file, inline, r, r2 = concurrently(
        lambda: _gdsllm("-v", "generate", "-m", model_dir, "-f", big, "-n", "4"),
        lambda: _gdsllm("-v", "generate", "-m", model_dir, "-p", "hello " * 400, "-n", "4"),
        lambda: _gdsllm("-v", "generate", "-m", plain, "-p", "hi", "--chat"),
        lambda: _gdsllm("-v", "run", "-m", plain))
    n = len(tok.encode(big.read_text()).ids)
    _one_line_error(from_file, "generate", f"-f {big}: prompt of {n} tokens does not fit the "
                                           f"model's context of 512")
    n = len(tok.encode("hello " * 400).ids)
    _one_line_error(inline, "generate", f"-p: prompt of {n} tokens does not fit the model's "
                                        f"context of 512")
    _one_line_error(r, "generate", "the model has no chat template")
    _one_line_error(r2, "run", "the model has no chat template")
    for r in (r, r2):
        assert "starting the I/O and compute workers" not in r.stderr and r.stdout == ""


def test_a_corrupt_unit_is_one_line_and_nothing_else(model_dir, tmp_path):
    """The clean error only: no WARNING about the arena the killed compute worker left, no
    multiprocessing resource-tracker warnings about it at exit."""
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    f = bad / "layer_002.bin"
    data = bytearray(f.read_bytes())
    data[100] ^= 0xFF
    f.write_bytes(bytes(data))
    r = _gdsllm("generate", "-m", bad, "--device", "cpu", "-p", "hi", "-n", "2")
    _one_line_error(r, "generate", "layer_002.bin")
    assert r.stderr.strip().count("\n") == 0, r.stderr


def test_busy_endpoint_is_an_error_not_a_hang():
    """A socket whose bind fails is closed (an open one would hang ctx.term() forever)."""
    import socket
    import threading

    import zmq

    from ipc import sockets
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        endpoint = f"tcp://127.0.0.1:{busy.getsockname()[1]}"
        ctx = zmq.Context()
        with pytest.raises(OSError, match=f"{endpoint}: Address already in use"):
            sockets.router(ctx, endpoint)
        t = threading.Thread(target=ctx.term, daemon=True)
        t.start()
        t.join(5)
        assert not t.is_alive(), "ctx.term() hangs on the socket that failed to bind"
        assert "Address already in use" in cli.user_error(OSError(98, f"{endpoint}: Address already in use"))


def test_serve_on_a_busy_endpoint_exits_with_one_line(model_dir):
    """Said before the workers start and before the HTTP page is announced."""
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        endpoint = f"tcp://127.0.0.1:{busy.getsockname()[1]}"
        r = _gdsllm("serve", "-m", model_dir, "--device", "cpu", "--endpoint", endpoint,
                    "--metrics-port", "-1", "--http-port", "0", timeout=120)
    _one_line_error(r, "serve", f"{endpoint}: Address already in use")
    assert "HTTP API" not in r.stderr and "starting the I/O" not in r.stderr, r.stderr


# --- one server for the rest ---------------------------------------------------------------------

class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(f"{record.levelname} {record.getMessage()}")

    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture(scope="module")
def server(model_dir):
    """A server with progress lines at every step (EVERY_S = 0) and its log records kept."""
    from gdsllm.service import progress
    logger, records, every = logging.getLogger("gdsllm"), _Records(), progress.EVERY_S
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    progress.EVERY_S = 0.0
    try:
        with Service(model_dir, vram_budget=131072 + 135168 + 2 * UNIT, prefetch_window=2) as s:
            yield s, records
    finally:
        progress.EVERY_S = every
        logger.removeHandler(records)
        logger.setLevel(level)


def _prompt_of(tokens: int, tok) -> str:
    """A raw prompt of exactly `tokens` tokens for the model's tokenizer."""
    text = ""
    while len(tok.encode(text + "a")) <= tokens:
        text += "a"
    assert len(tok.encode(text)) == tokens
    return text


def _tokenizer(server):
    from gdsllm.engine.tokenizer import Tokenizer
    from gdsllm.format.metadata import load_model_meta
    return Tokenizer(load_model_meta(server.svc.config.model))


def test_start_up_phases_and_prefill_progress_are_logged(server):
    s, records = server
    text = records.text()
    for words in ("starting the I/O and compute workers", "workers ready in",
                  "loaded 2 resident units", "serving"):
        assert words in text, text
    with Client(s.endpoint, timeout=60) as c:
        c.generate(_prompt_of(40, _tokenizer(s)), max_tokens=2, temperature=0)
    for unit in range(1, 7):  # embed, 4 blocks, head
        assert f"prefill of 40 prompt tokens: {unit} of 6 units" in records.text()
    assert "prefill of 40 prompt tokens done in" in records.text()


def test_resident_load_progress_bar_on_a_terminal_and_lines_elsewhere(monkeypatch, caplog):
    from gdsllm.service import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    tty = Terminal()
    bar = progress.LoadProgress(3, 3 << 20, stream=tty)
    for _ in range(3):
        bar.update(1 << 20)
    bar.close()
    assert "loading resident units" in tty.getvalue() and "3.00M" in tty.getvalue()
    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="gdsllm"):
        lines = progress.LoadProgress(3, 3 << 20, stream=io.StringIO())
        for _ in range(3):
            lines.update(1 << 20)
        lines.close()
    assert "loading resident units: 1 of 3" in caplog.text and "loaded 3 resident units" in caplog.text


def test_context_limit_is_said_and_an_error_reply_is_not_a_vanished_client(server, capsys):
    from gdsllm.commands.generate import generate_endpoint
    s, records = server
    prompt = _prompt_of(508, _tokenizer(s))  # the context is 512: room for 4 new tokens
    args = argparse.Namespace(prompt=prompt, max_tokens=20, temp=0.0, top_p=None, top_k=None,
                              seed=None, chat=False, endpoint=s.endpoint)
    assert generate_endpoint(args) == 0
    err = capsys.readouterr().err
    assert "stopped at the model's context limit (508 prompt + 4 new tokens), before the 20" in err
    args.max_tokens = 4  # -n itself ended it: nothing to say
    assert generate_endpoint(args) == 0 and "context limit" not in capsys.readouterr().err
    args.prompt = prompt + "a" * 20
    assert generate_endpoint(args) == 1
    assert "does not fit the model's context" in capsys.readouterr().err
    with Client(s.endpoint, timeout=30) as c:  # the coordinator has handled everything before
        assert c.health().status == "ok"
    assert "unreachable" not in records.text(), records.text()


def test_run_repl_help_reset_unknown_commands_and_errors(server):
    from gdsllm.commands.run import HELP, chat
    s, _ = server
    long_message = "hello " * 400
    stdin = io.StringIO(f"/help\n/nosuch\nhi there\n/reset\n{long_message}\nhi there\n/quit\n")
    out, err = io.StringIO(), io.StringIO()
    repl = argparse.Namespace(system="be brief", max_tokens=6, temp=0.0, top_p=0.95, top_k=40, seed=None)
    with Client(s.endpoint, timeout=60) as c:
        chat(c, repl, stdin=stdin, stdout=out, stderr=err)
        answer = c.generate(messages=[{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": "hi there"}],
                            max_tokens=6, temperature=0).text
    notes = err.getvalue()
    assert HELP in notes and all(cmd in HELP for cmd in ("/help", "/reset", "/quit"))
    assert "unknown command /nosuch" in notes
    assert "conversation reset (system prompt kept)" in notes
    assert "does not fit the model's context" in notes
    # the failed turn was not kept: the question after it gets the same answer as after /reset
    assert out.getvalue() == 2 * (answer + "\n")


# --- prompts from a file or stdin, and Ctrl-C in `run` --------------------------------------------

def test_prompt_from_a_file_or_stdin_is_the_same_prompt(model_dir, tmp_path):
    common = ["generate", "-m", model_dir, "--single-process", "-n", "6", "--temp", "0"]
    (tmp_path / "p.txt").write_text("once upon a time", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    inline, from_file, piped, missing, r = concurrently(
        lambda: _gdsllm(*common, "-p", "once upon a time"),
        lambda: _gdsllm(*common, "-f", tmp_path / "p.txt"),
        lambda: subprocess.run([sys.executable, "-m", "gdsllm", *map(str, common), "-p", "-"],
                               cwd=ROOT, env=env, input="once upon a time", capture_output=True,
                               text=True, timeout=300),
        lambda: _gdsllm(*common, "-f", tmp_path / "missing.txt"),
        lambda: _gdsllm(*common, "-p", "x", "-f", tmp_path / "p.txt"))  # one or the other
    assert inline.returncode == 0 and inline.stdout.strip(), inline.stderr
    assert from_file.stdout == inline.stdout
    assert piped.stdout == inline.stdout, piped.stderr
    _one_line_error(missing, "generate", "-f")
    assert r.returncode == 2 and "not allowed with argument" in r.stderr  # said by argparse


class _Pty:
    """`gdsllm run` with a pseudo-terminal as its controlling terminal and stdin: "\\x03" typed
    there is a real Ctrl-C (the kernel sends SIGINT to the foreground process group), and a
    half-typed line is the terminal's to drop."""

    def __init__(self, *args):
        import fcntl
        import pty
        import termios
        import threading
        self.master, slave = pty.openpty()
        attrs = termios.tcgetattr(slave)
        attrs[3] &= ~termios.ECHO  # nothing to read back on the master side
        termios.tcsetattr(slave, termios.TCSANOW, attrs)

        def controlling_terminal():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "gdsllm", "run", *map(str, args)],
                                     cwd=ROOT, env=env, stdin=slave, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, preexec_fn=controlling_terminal)
        os.close(slave)
        self.out, self.err = bytearray(), bytearray()
        for stream, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._drain, args=(stream, buf), daemon=True).start()

    @staticmethod
    def _drain(stream, buf: bytearray) -> None:
        while chunk := stream.read1(4096):
            buf.extend(chunk)

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait_for(self, buf: bytearray, words: str, after: int = 0, timeout: float = 120) -> int:
        """Wait until `words` appears in `buf` after offset `after`; its end offset."""
        import time
        deadline = time.monotonic() + timeout
        while (i := buf.find(words.encode(), after)) < 0:
            assert self.proc.poll() is None or buf.find(words.encode(), after) >= 0, \
                f"gdsllm run exited ({self.proc.returncode}): {self.err.decode(errors='replace')}"
            assert time.monotonic() < deadline, f"no {words!r} in {bytes(buf)!r}"
            time.sleep(0.02)
        return i + len(words)


def test_ctrl_c_in_run_stops_one_answer_or_one_line_and_twice_leaves(model_dir):
    from gdsllm.commands.run import AGAIN, HELP, STOPPED
    t = _Pty("-m", model_dir, "--device", "cpu", "-n", "400", "--temp", "0")
    try:
        end = t.wait_for(t.out, ">>> ")
        t.type("tell me a story\n")  # 400 tokens, no end of text: still answering when stopped
        t.wait_for(t.out, "", after=end + 1)  # the first characters of the answer are out
        t.type("\x03")
        err = t.wait_for(t.err, STOPPED)
        end = t.wait_for(t.out, ">>> ", after=end)  # back at the prompt, the service still up
        t.type("half a li")
        t.type("\x03")  # the terminal drops the half-typed line
        err = t.wait_for(t.err, AGAIN, after=err)
        t.type("/help\n")  # read as typed: no "half a li" in front of it
        err = t.wait_for(t.err, HELP, after=err)
        t.type("\x03")
        err = t.wait_for(t.err, AGAIN, after=err)
        t.type("\x03")  # a second Ctrl-C in a row: leave
        assert t.proc.wait(60) == 0, t.err.decode(errors="replace")
        assert "unknown command" not in t.err.decode() and "interrupted" not in t.err.decode()
    finally:
        if t.proc.poll() is None:
            t.proc.kill()
        t.proc.wait()
        os.close(t.master)


class _Stopping:
    """A client whose answer stops with Ctrl-C after its first delta; it records what it is sent
    and whether the stream was closed (which cancels the request)."""

    def __init__(self):
        self.sent, self.closed = [], 0

    def stream(self, messages, **params):
        self.sent.append([dict(m) for m in messages])
        try:
            yield "Once"
            if len(self.sent) == 1:
                raise KeyboardInterrupt
            yield " more"
        finally:
            self.closed += 1


def test_a_stopped_answer_stays_in_the_conversation():
    from gdsllm.commands.run import STOPPED, chat
    client, out, err = _Stopping(), io.StringIO(), io.StringIO()
    repl = argparse.Namespace(system=None, max_tokens=8, temp=0.0, top_p=0.95, top_k=40, seed=None)
    chat(client, repl, stdin=io.StringIO("and then?\n"), stdout=out, stderr=err, first="a story")
    assert STOPPED in err.getvalue() and out.getvalue() == "Once\nOnce more\n"
    assert client.closed == 2  # the stopped stream was closed too: its request is cancelled
    assert client.sent[1] == [{"role": "user", "content": "a story"},
                              {"role": "assistant", "content": "Once"},
                              {"role": "user", "content": "and then?"}]


# --- quiet, fast, and errors in the words of the command line ------------------------------------

def test_help_imports_no_torch_and_dtype_names_agree():
    code = ("import sys; from gdsllm import cli; p = cli.build_parser(); "
            "[a.choices[c].format_help() for a in p._actions if a.choices for c in a.choices "
            "if c != 'synth']; print(sorted(m for m in ('torch', 'numpy', 'zmq', 'gdsllm.engine') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
    from gdsllm.commands.options import DTYPE_NAMES
    from gdsllm.format.metadata import DTYPES
    assert set(DTYPE_NAMES) == set(DTYPES)


def test_generate_is_quiet_by_default_and_says_more_with_v(model_dir):
    quiet, loud = concurrently(
        lambda: _gdsllm("generate", "-m", model_dir, "--device", "cpu", "-p", "hi", "-n", "2"),
        lambda: _gdsllm("generate", "-v", "-m", model_dir, "--device", "cpu", "-p", "hi", "-n", "2"))
    assert quiet.returncode == 0 and quiet.stdout.strip(), quiet.stderr
    assert quiet.stderr == "", quiet.stderr
    assert loud.stdout == quiet.stdout or loud.returncode == 0
    assert " INFO " in loud.stderr and "workers ready in" in loud.stderr and " DEBUG " not in loud.stderr
    assert cli.log_level("serve", 0) == logging.INFO and cli.log_level("run", 2) == logging.DEBUG


def test_errors_name_the_flags(model_dir):
    from gdsllm.commands.options import sampling_params, size_option
    cases = [(("-n", "0"), "-n must be at least 1"), (("--top-p", "2"), "--top-p must be in (0, 1]"),
             (("--temp", "-1"), "--temp must be >= 0"), (("--top-k", "-3"), "--top-k must be >= 0")]
    for command in ("generate", "run"):
        for args, words in cases:
            ns = cli.build_parser().parse_args([command, "-p", "hi", *args])
            with pytest.raises(ValueError) as e:
                sampling_params(ns)
            assert str(e.value).startswith(words), e.value
    with pytest.raises(ValueError, match="^--kv-budget: not a size: 'banana'"):
        size_option("banana", "--kv-budget")
    # and through the command line, before anything starts: one line each
    size, r = concurrently(
        lambda: _gdsllm("generate", "-m", model_dir, "-p", "hi", "--vram-budget", "banana"),
        lambda: _gdsllm("run", "-m", model_dir, "--top-p", "2"))
    _one_line_error(size, "generate", "--vram-budget: not a size: 'banana'")
    _one_line_error(r, "run", "--top-p must be in (0, 1]")
    assert "top_p" not in r.stderr


def test_bench_leaves_the_page_cache_alone_unless_told(model_dir, monkeypatch, capsys):
    from gdsllm.commands import bench
    from gdsllm.service import benchmark
    calls = []
    monkeypatch.setattr(benchmark, "drop_caches", lambda: calls.append(1) or False)
    assert bench._drop_caches(argparse.Namespace(drop_caches=False)) is False and calls == []
    # Told to, but not allowed (not root): it says what it is about to do, then why it cannot.
    args = cli.build_parser().parse_args(["bench", "-m", str(model_dir), "--device", "cpu",
                                          "--drop-caches"])
    with pytest.raises(ValueError, match=r"--drop-caches: cannot write /proc/sys/vm/drop_caches "
                                         r"\(needs root\)"):
        args.func(args)
    assert calls == [1] and capsys.readouterr().err.splitlines() == [
        "gdsllm bench: dropping the whole machine's page cache (--drop-caches)"]


def test_convert_onto_an_existing_destination_refuses_before_reading_the_source(tmp_path):
    src = tmp_path / "broken.gguf"
    src.write_bytes(b"GGUF" + b"\xff" * 64)  # reading it would fail with another error
    (tmp_path / "out").mkdir()
    r = _gdsllm("convert", src, tmp_path / "out")
    _one_line_error(r, "convert", f"{tmp_path / 'out'}: already exists")
