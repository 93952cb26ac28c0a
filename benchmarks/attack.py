"""The outside attack of issue 24, repeated as a script: mixed HTTP and ZeroMQ load on a real
`gdsllm serve` (CPU backend, a tiny random model, loopback only, bounded in time), with the
reproduced attacks and worker faults injected while it runs.

    OMP_NUM_THREADS=1 PYTHONPATH=. python3 benchmarks/attack.py                  # 3 minutes
    OMP_NUM_THREADS=1 PYTHONPATH=. python3 benchmarks/attack.py --duration 60 --clients 4

Load: --clients ZeroMQ clients and as many HTTP clients (half of them streaming), each in a loop
of short seeded requests. Attacks, at fixed fractions of --duration: a temperature of 1e-300
(HTTP), a prompt over 1 MiB (HTTP and ZeroMQ), ten pipelined chat requests of 20,000 messages
(ZeroMQ), 500 garbage frames (ZeroMQ), a cross-site text/plain POST with `Host: evil.example`,
300 idle TCP connections held open, a SIGKILL of the compute worker, a SIGSTOP of the I/O worker
(left stopped: the service must notice), a SIGKILL of the I/O worker.

Prints a summary and one JSON line: requests sent, completed, errors by code (those ended by a
worker fault counted apart: a fault fails the requests in flight by design), lost (no terminal
reply within --request-timeout: must be 0), p50/p99 latency of the completed ones, the
coordinator's RSS after warm-up and at the end, the time to recover after each fault, the load
average, and how long the idle service took to exit after SIGTERM. Exit status 1 if any request
was lost or the service did not recover.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gdsllm.service.client import Client, ServiceError  # noqa: E402
from gdsllm.service.benchmark import children, free_port  # noqa: E402

IDLE_WAIT_S = 12.0  # how long the idle connections are held before counting those closed
PROMPTS = ["hello world", "the quick brown fox", "once upon a time", "1 2 3 4", "GdsLLM streams"]


def rss(pid: int) -> int:
    """Resident bytes of `pid` (0 if gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.sent = 0
        self.done: list[float] = []
        self.errors: Counter = Counter()
        self.fault_errors: Counter = Counter()  # ended by an injected worker fault
        self.lost = 0
        self.fault_window = False

    def error(self, code: str) -> None:
        with self.lock:
            (self.fault_errors if self.fault_window or code in ("worker_died", "timeout")
             else self.errors)[code] += 1


class Attack:
    def __init__(self, args):
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="gx", dir="/tmp"))
        from gdsllm.convert.synth import synth
        self.model = synth(self.work / "tiny", shape="tiny", layers=4, dtype="float32", seed=7)
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.http_port = free_port()
        self.stats = Stats()
        self.stop = threading.Event()
        self.events: dict[str, object] = {}
        self.log = open(self.work / "serve.log", "wb")
        unit = 192512  # a float32 block of the tiny shape: embed and head resident, blocks streamed
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gdsllm", "serve", "-m", str(self.model), "--device", "cpu",
             "--endpoint", self.endpoint, "--http-port", str(self.http_port), "--metrics-port", "-1",
             "--vram-budget", str(131072 + 135168 + 2 * unit), "--max-batch", "32"],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=self.log, stderr=subprocess.STDOUT)

    # ------------------------------------------------------------------ helpers

    def health(self, timeout: float = 5.0):
        try:
            with Client(self.endpoint, timeout=timeout) as c:
                return c.health()
        except (TimeoutError, ServiceError):
            return None

    def wait_ok(self, within: float, restarts: int | None = None) -> float | None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < within:
            h = self.health(2.0)
            if h is not None and h.status == "ok" and (restarts is None or h.restarts > restarts):
                return time.monotonic() - t0
            time.sleep(0.1)
        return None

    def workers(self) -> dict[str, int]:
        """{"io": pid, "compute": pid}: the compute worker is the one owning a /dev/shm arena."""
        out = {}
        for pid in children(self.proc.pid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"resource_tracker" in cmd:
                continue
            owns = any(n.startswith(f"gdsllm-{pid}-") for n in os.listdir("/dev/shm"))
            out["compute" if owns else "io"] = pid
        return out

    # ------------------------------------------------------------------ load

    def zmq_client(self, k: int) -> None:
        rng = random.Random(k)
        with Client(self.endpoint, timeout=self.args.request_timeout) as c:
            while not self.stop.is_set():
                with self.stats.lock:
                    self.stats.sent += 1
                t0 = time.monotonic()
                try:
                    kw = dict(max_tokens=rng.randint(2, 16), temperature=0.7, seed=rng.randrange(1 << 31))
                    if rng.random() < 0.5:
                        c.generate(rng.choice(PROMPTS), **kw)
                    else:
                        for _ in c.stream(rng.choice(PROMPTS), **kw):
                            pass
                    with self.stats.lock:
                        self.stats.done.append(time.monotonic() - t0)
                except ServiceError as e:
                    self.stats.error(e.code)
                except TimeoutError:
                    with self.stats.lock:
                        self.stats.lost += 1
                    return  # the socket's state is unknown: this client stops

    def http_client(self, k: int) -> None:
        rng = random.Random(1000 + k)
        stream = k % 2 == 1
        while not self.stop.is_set():
            with self.stats.lock:
                self.stats.sent += 1
            t0 = time.monotonic()
            body = {"prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(2, 16), "temperature": 0.7,
                    "seed": rng.randrange(1 << 31), "stream": stream}
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=self.args.request_timeout)
                conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
                conn.close()
            except socket.timeout:  # no answer within --request-timeout
                with self.stats.lock:
                    self.stats.lost += 1
                continue
            except (OSError, http.client.HTTPException) as e:  # refused, reset: never accepted
                self.stats.error(f"http_{type(e).__name__}")
                continue
            errors = [json.loads(line[6:])["error"] for line in data.split(b"\n")
                      if stream and line.startswith(b"data: {") and b'"error"' in line]
            if r.status != 200:
                self.stats.error(f"http_{r.status}")
            elif errors:
                self.stats.error(f"sse_{errors[0].get('code', '?')}")
            else:
                with self.stats.lock:
                    self.stats.done.append(time.monotonic() - t0)

    # ------------------------------------------------------------------ attacks

    def post(self, body: bytes, headers: dict, timeout: float = 60.0) -> int:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
            conn.request("POST", "/v1/completions", body, headers)
            status = conn.getresponse().status
            conn.close()
            return status
        except (OSError, http.client.HTTPException) as e:
            return -1 if isinstance(e, socket.timeout) else 0

    def raw_zmq(self, frames: list[bytes], timeout: float = 60.0) -> int:
        """Send each frame on one DEALER; the number of replies within `timeout`."""
        import zmq
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.endpoint)
        for f in frames:
            s.send(f)
        got, end = 0, time.monotonic() + timeout
        while got < len(frames) and s.poll(max(1, int((end - time.monotonic()) * 1000))):
            s.recv()
            got += 1
        s.close()
        ctx.term()
        return got

    def attacks(self) -> None:
        import msgpack
        d, t0 = self.args.duration, time.monotonic()
        ev = self.events

        def at(fraction: float) -> bool:
            while time.monotonic() - t0 < fraction * d:
                if self.stop.wait(0.1):
                    return False
            return True

        ev["rss_warm"] = rss(self.proc.pid) if at(0.05) else 0
        if at(0.08):
            ev["tiny_temperature_status"] = self.post(json.dumps(
                {"prompt": "x", "max_tokens": 2, "temperature": 1e-300}).encode(), {"Content-Type": "application/json"})
        if at(0.12):
            ev["http_over_1mib_status"] = self.post(json.dumps({"prompt": "a" * 1048600}).encode(),
                                                    {"Content-Type": "application/json"})
            big = msgpack.packb({"type": "generate", "request_id": "big", "prompt": "a" * 1048600})
            ev["zmq_over_1mib_replies"] = self.raw_zmq([big])
        if at(0.16):
            huge = [{"role": "user", "content": "hi"}] * 20_000
            frames = [msgpack.packb({"type": "generate", "request_id": f"chat-{i}", "messages": huge})
                      for i in range(10)]
            ev["huge_chat_replies"] = self.raw_zmq(frames)
        if at(0.20):
            rng = random.Random(7)
            ev["garbage_replies_of_500"] = self.raw_zmq([rng.randbytes(rng.randrange(1, 200)) for _ in range(500)])
        if at(0.24):
            ev["cross_site_status"] = self.post(b'{"prompt":"x","max_tokens":2}',
                                                {"Content-Type": "text/plain", "Host": "evil.example"})
        if at(0.28):
            held = []
            for _ in range(300):
                try:
                    held.append(socket.create_connection(("127.0.0.1", self.http_port), timeout=5))
                except OSError:
                    break
            ev["idle_connections_opened"] = len(held)
            self.stop.wait(max(0.05 * d, IDLE_WAIT_S))  # past serve's --http-header-timeout (10 s)
            closed = 0
            for s in held:
                s.setblocking(False)
                try:
                    closed += s.recv(1) == b""
                except BlockingIOError:
                    pass
                except OSError:
                    closed += 1
                s.close()
            ev["idle_connections_closed_by_server"] = closed
        for frac, name, sig in ((0.40, "compute", signal.SIGKILL), (0.60, "io", signal.SIGSTOP),
                                (0.80, "io", signal.SIGKILL)):
            if not at(frac):
                return
            h = self.health()
            restarts = h.restarts if h else 0
            pid = self.workers().get(name)
            label = f"{signal.Signals(sig).name}_{name}"
            if pid is None:
                ev[label] = "worker not found"
                continue
            self.stats.fault_window = True
            t = time.monotonic()
            os.kill(pid, sig)
            detected = None
            while time.monotonic() - t < 120:
                h = self.health(2.0)
                if h is None or h.status != "ok" or h.restarts > restarts:
                    detected = time.monotonic() - t
                    break
                time.sleep(0.05)
            recovered = self.wait_ok(120, restarts)
            ev[label] = {"detected_s": detected, "recovered_s": None if recovered is None
                         else round(time.monotonic() - t, 2)}
            time.sleep(1.0)  # requests in flight at the fault have ended
            self.stats.fault_window = False

    # ------------------------------------------------------------------ run

    def run(self) -> dict:
        a = self.args
        if self.wait_ok(300) is None:
            raise SystemExit(f"the service did not start: see {self.work / 'serve.log'}")
        load0 = os.getloadavg()
        threads = [threading.Thread(target=self.zmq_client, args=(k,), daemon=True) for k in range(a.clients)]
        threads += [threading.Thread(target=self.http_client, args=(k,), daemon=True) for k in range(a.clients)]
        attacker = threading.Thread(target=self.attacks, daemon=True)
        t0 = time.monotonic()
        for t in threads + [attacker]:
            t.start()
        self.stop.wait(a.duration)
        self.stop.set()
        for t in threads + [attacker]:
            t.join(a.request_timeout + 30)
        elapsed = time.monotonic() - t0
        rss_end = rss(self.proc.pid)
        ok_at_end = self.health()
        time.sleep(2)  # idle
        t = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = "killed after 60 s"
        exit_s = time.monotonic() - t
        s = self.stats
        lat = sorted(s.done)
        pct = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None)
        return {"duration_s": round(elapsed, 1), "clients_zmq": a.clients, "clients_http": a.clients,
                "requests_sent": s.sent, "completed": len(lat), "errors": dict(s.errors),
                "errors_from_injected_faults": dict(s.fault_errors), "lost": s.lost,
                "p50_s": pct(0.5), "p99_s": pct(0.99),
                "coordinator_rss_warm_bytes": self.events.get("rss_warm"), "coordinator_rss_end_bytes": rss_end,
                "health_at_end": ok_at_end.status if ok_at_end else None,
                "sigterm_exit_s": round(exit_s, 2), "exit_status": rc,
                "loadavg_start": [round(x, 2) for x in load0], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                "attacks": {k: v for k, v in self.events.items() if k != "rss_warm"},
                "log": str(self.work / "serve.log")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of load (default 180)")
    ap.add_argument("--clients", type=int, default=8, help="ZeroMQ clients, and as many HTTP ones")
    ap.add_argument("--request-timeout", type=float, default=120.0,
                    help="seconds without a terminal reply before a request counts as lost")
    args = ap.parse_args(argv)
    attack = Attack(args)
    try:
        out = attack.run()
    finally:
        if attack.proc.poll() is None:
            attack.proc.kill()
            attack.proc.wait()
        attack.log.close()
    for k, v in out.items():
        print(f"{k}: {v}")
    print(json.dumps(out))
    faults = [v for k, v in out["attacks"].items() if k.startswith("SIG")]
    recovered = all(isinstance(v, dict) and v["recovered_s"] is not None for v in faults)
    return 0 if out["lost"] == 0 and recovered and out["health_at_end"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
