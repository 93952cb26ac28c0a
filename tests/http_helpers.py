"""Shared by the HTTP tests: a real `gdsllm serve --http-port` process on free ports, and small
HTTP helpers (standard library only, so a test sees the bytes the server sent)."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, headers: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    return post(url, None, headers, timeout, method="GET")


def post(url: str, body, headers: dict | None = None, timeout: float = 120,
         method: str = "POST") -> tuple[int, dict]:
    """(status, JSON body) of one request; `body` a dict (sent as JSON), bytes (sent as is)."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def open_stream(port: int, path: str, body: dict, headers: dict | None = None):
    """Start a streamed request and return (connection, response) with the headers read."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
    return conn, conn.getresponse()


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def wait_for(cond, what: str, timeout: float = 60.0, proc=None):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if proc is not None:
            assert proc.poll() is None, f"gdsllm serve exited with {proc.returncode} while waiting {what}"
        assert time.monotonic() < deadline, f"timed out waiting {what}"
        time.sleep(0.05)


class HttpServe:
    """`gdsllm serve -m MODEL --device cpu --http-port PORT ...` in a child process."""

    def __init__(self, model: Path, log: Path, *extra: str, wait: bool = True):
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.metrics_port, self.port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gdsllm", "serve", "-m", str(model), "--device", "cpu",
             "--endpoint", self.endpoint, "--metrics-port", str(self.metrics_port),
             "--http-port", str(self.port), *extra],
            cwd=ROOT, env={**{k: v for k, v in os.environ.items() if k != "GDSLLM_API_KEY"},
                           "PYTHONPATH": str(ROOT)}, stdout=self.log,
            stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()

    def answering(self) -> int | None:
        """/health's status code, None while nothing listens on the port."""
        try:
            return get(self.url + "/health", timeout=10)[0]
        except OSError:
            return None

    def wait_ready(self, timeout: float = 180.0) -> None:
        wait_for(lambda: self.answering() == 200, "for /health 200", timeout, self.proc)

    def children(self) -> list[int]:
        out = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]
